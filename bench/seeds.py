"""Per-source figures of a recipe over its seeds, worst source first, from the exported cards.

    python bench/seeds.py \\
        "v15=runs/v15-s0/export/dermwatch-float32.tflite,runs/v15-s1/export/dermwatch-float32.tflite,..." \\
        "shipped=dermwatch/models/dermwatch.tflite"

Each recipe is a name and the models its seeds trained (each scored by `dermwatch export`,
with --external for another clinic). For every source a card scores (each --data root's
validation images, each external clinic) the table gives the mean over the seeds and the
range, so a recipe is judged on its worst source and not on one lucky split. A seed also
draws its own lesion-grouped split, so the spread holds the split's noise too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dermwatch.modelcard import load_card

METRICS = [
    ("melanoma_vs_nevus_auc", "melanoma vs nevus AUC"), ("melanoma_roc_auc", "melanoma AUC"),
    ("melanoma_sensitivity", "sensitivity"), ("melanoma_specificity", "specificity"),
    ("nevus_flag_rate", "nevi flagged"), ("balanced_accuracy", "balanced acc."),
]
#: The sets of a card that are one source each (the pooled validation and Test sets are not).
SOURCE_PREFIXES = ("validation:", "external:")


def source_sets(card: dict) -> dict[str, dict]:
    return {name: metrics for name, metrics in card["evaluation"]["sets"].items() if name.startswith(SOURCE_PREFIXES)}


def seed_rows(name: str, cards: list[dict]) -> list[dict]:
    """One row per source every seed scored: mean, min and max of each metric, worst first."""
    per_seed = [source_sets(card) for card in cards]
    sources = set.intersection(*(set(sets) for sets in per_seed))
    rows = []
    for source in sources:
        row = {"recipe": name, "source": source, "seeds": len(cards),
               "images": round(float(np.mean([sets[source]["images"] for sets in per_seed])))}
        for key, _ in METRICS:
            values = [sets[source][key] for sets in per_seed if sets[source].get(key) is not None]
            row[key] = (float(np.mean(values)), min(values), max(values)) if values else None
        rows.append(row)
    return sorted(rows, key=lambda r: r["melanoma_vs_nevus_auc"][0] if r["melanoma_vs_nevus_auc"] else 1.0)


def cell(value: tuple[float, float, float] | None) -> str:
    if value is None:
        return "n/a"
    mean, low, high = value
    return f"{mean:.3f}" if low == high else f"{mean:.3f} ({low:.3f}–{high:.3f})"


def markdown(rows: list[dict]) -> str:
    header = ["recipe", "source", "seeds", "images", *[title for _, title in METRICS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["recipe"], row["source"], str(row["seeds"]), str(row["images"]),
                 *[cell(row[key]) for key, _ in METRICS]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", help='NAME=MODEL[,MODEL...]: the .tflite of each seed of one recipe')
    args = parser.parse_args()
    rows = []
    for recipe in args.recipes:
        name, _, paths = recipe.partition("=")
        rows += seed_rows(name, [load_card(Path(path)).document for path in paths.split(",")])
    print(markdown(rows))
    print("\nRows of each recipe run worst source first (by mean melanoma-vs-nevus AUC); "
          "brackets: the lowest and highest seed.")


if __name__ == "__main__":
    main()
