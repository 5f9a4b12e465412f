"""One table for several exported models, from their model cards: same images, same metrics.

    python bench/compare_models.py "seed recipe=runs/seed/export/dermwatch-float32.tflite" \\
        "dermnet=runs/dermnet/export/dermwatch-float32.tflite" [--set test_leak_free] [--card MODEL]

With --card, the table is also stored in that model's card (field "comparisons") and its
HTML card is rendered again, so the shipped card shows what each change bought. With
--rescore, each model is first scored again by today's evaluation code on its own run's
manifest (runs/NAME/manifest.csv, two folders above the .tflite), and its card updated:
cards written before a metric existed then carry it too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dermwatch.modelcard import load_card
from dermwatch.training.evaluate import evaluate_model
from dermwatch.training.export import read_manifest, write_card_and_html

COLUMNS = [
    ("accuracy", "accuracy"), ("balanced_accuracy", "balanced acc."), ("melanoma_roc_auc", "melanoma AUC"),
    ("melanoma_vs_nevus_auc", "melanoma vs nevus AUC"),
    ("melanoma_sensitivity", "sensitivity"), ("melanoma_specificity", "specificity"),
    ("expected_calibration_error", "ECE"),
]


def rows_for(named_models: list[str], set_names: list[str]) -> list[dict]:
    rows = []
    for item in named_models:
        name, _, path = item.partition("=")
        card = load_card(Path(path)).document
        sets = card["evaluation"]["sets"]
        for set_name in [s for s in set_names if s in sets]:  # one root: no per-root sets
            metrics = sets[set_name]
            rows.append({"model": name, "set": set_name, "images": metrics["images"],
                         "bytes": Path(path).stat().st_size,
                         **{key: round(metrics[key], 3) for key, _ in COLUMNS}})
    return rows


def rescore(path: Path) -> None:
    """Evaluate ``path`` again on its run's own manifest and store the result in its card."""
    run_dir = path.parent.parent
    document = load_card(path).document
    document["evaluation"] = evaluate_model(path, read_manifest(run_dir / "manifest.csv"))
    write_card_and_html(path, document)


def markdown(rows: list[dict]) -> str:
    header = ["model", "set", "images", *[title for _, title in COLUMNS], "size"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["model"], row["set"], str(row["images"]), *[f"{row[key]:.3f}" for key, _ in COLUMNS],
                 f"{row['bytes'] / 1e6:.2f} MB"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="NAME=PATH of an exported .tflite with its card")
    parser.add_argument("--set", dest="sets", action="append", help="validation, test_published, test_leak_free")
    parser.add_argument("--card", type=Path, help="store the table in this model's card")
    parser.add_argument("--rescore", action="store_true", help="evaluate each model again on its run's manifest")
    args = parser.parse_args()
    if args.rescore:
        for item in args.models:
            rescore(Path(item.partition("=")[2]))
    rows = rows_for(args.models, args.sets or ["test_leak_free"])
    print(markdown(rows))
    if args.card:
        document = load_card(args.card).document
        document["comparisons"] = rows
        write_card_and_html(args.card, document)


if __name__ == "__main__":
    main()
