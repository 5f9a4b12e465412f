"""The human-readable model card: one self-contained HTML page with its plots inline."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from jinja2 import Environment, PackageLoader, select_autoescape  # noqa: E402

from dermwatch.labels import CLASS_NAMES  # noqa: E402
from dermwatch.training.metrics import defined, figure  # noqa: E402
from dermwatch.training.seed_table import SEED_METRICS, SOURCE_PREFIXES, spread_text  # noqa: E402

SET_TITLES = {
    "validation": "Validation (lesion-grouped split of the training folders)",
    "test_published": "Test as published (includes images leaked from Train)",
    "test_leak_free": "Test, leak-free part (the honest figure)",
}


def set_title(name: str) -> str:
    """The card's heading for a set; "validation:ROOT" is validation restricted to one data root."""
    if name.startswith("validation:"):
        return f"Validation, only images from {name.partition(':')[2]}/"
    if name.startswith("external:"):
        return f"{name.partition(':')[2]}, another clinic (never trained on)"
    return SET_TITLES.get(name, name)


def sources_worst_first(sets: dict[str, dict]) -> list[tuple[str, dict]]:
    """The one-source sets, the one that tells melanoma from nevus worst first (n/a last)."""
    def auc(item: tuple[str, dict]) -> float:
        value = item[1].get("melanoma_vs_nevus_auc")
        return value if defined(value) else np.inf

    return sorted(((name, m) for name, m in sets.items() if name.startswith(SOURCE_PREFIXES)), key=auc)


def render_card_html(card: dict[str, Any], path: Path) -> Path:
    environment = Environment(loader=PackageLoader("dermwatch", "templates"), autoescape=select_autoescape())
    environment.globals["figure"] = figure
    environment.globals["spread"] = spread_text
    plots = {}
    history = card.get("training", {}).get("history")
    if history:
        plots["Training curves"] = _png(_training_curves(history))
    sets = card.get("evaluation", {}).get("sets", {})
    if "test_leak_free" in sets:
        plots["Confusion matrix, leak-free Test"] = _png(_confusion(sets["test_leak_free"]["confusion_matrix"]))
    if sets:
        plots["Melanoma ROC"] = _png(_roc(sets, card["melanoma_threshold"]))
    html = environment.get_template("model_card.html").render(
        card=card, sets=sets, titles={name: set_title(name) for name in sets}, labels=CLASS_NAMES, plots=plots,
        sources=sources_worst_first(sets), seed_metrics=SEED_METRICS,
    )
    path.write_text(html)
    return path


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _training_curves(history: list[dict]):
    epochs = [h["epoch"] for h in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(epochs, [h["loss"] for h in history], label="training loss (as balanced by --balance)")
    left.set_xlabel("epoch")
    left.legend()
    for key, label in (("accuracy", "training accuracy (augmented)"), ("val_accuracy", "validation accuracy"),
                       ("val_balanced_accuracy", "validation balanced accuracy"),
                       ("val_melanoma_auc", "validation melanoma ROC AUC")):
        right.plot(epochs, [h[key] for h in history], label=label)
    right.set_xlabel("epoch")
    right.set_ylim(0, 1)
    right.legend(fontsize=8)
    return figure


def _confusion(matrix: list[list[int]]):
    values = np.array(matrix)
    figure, axes = plt.subplots(figsize=(6.5, 5.5))
    axes.imshow(values, cmap="Blues")
    short = [name.replace(" ", "\n") for name in CLASS_NAMES]
    axes.set_xticks(range(len(CLASS_NAMES)), short, fontsize=7, rotation=90)
    axes.set_yticks(range(len(CLASS_NAMES)), short, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (row, column), value in np.ndenumerate(values):
        if value:
            axes.text(column, row, str(value), ha="center", va="center",
                      color="white" if value > values.max() / 2 else "black", fontsize=8)
    return figure


def _roc(sets: dict[str, Any], threshold: float):
    figure, axes = plt.subplots(figsize=(5, 5))
    for name, metrics in sets.items():
        points = metrics["roc_points"]
        axes.plot(points["false_positive_rate"], points["true_positive_rate"],
                  label=f"{name} (AUC {metrics['melanoma_roc_auc']:.3f})")
        axes.plot(1 - metrics["melanoma_specificity"], metrics["melanoma_sensitivity"], "o", color="black")
    axes.plot([0, 1], [0, 1], ":", color="grey")
    axes.set_xlabel("1 - specificity")
    axes.set_ylabel("sensitivity")
    axes.set_title(f"dots: alert threshold {threshold:.3f}")
    axes.legend(fontsize=8)
    return figure
