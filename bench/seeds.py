"""Per-source figures of a recipe over its seeds, worst source first, from the exported cards.

    python bench/seeds.py \\
        "v15=runs/v15-s0/export/dermwatch-float32.tflite,runs/v15-s1/export/dermwatch-float32.tflite,..." \\
        "shipped=dermwatch/models/dermwatch.tflite" [--against shipped]

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
from dermwatch.training.card_html import SOURCE_PREFIXES

METRICS = [
    ("melanoma_vs_nevus_auc", "melanoma vs nevus AUC"), ("melanoma_roc_auc", "melanoma AUC"),
    ("melanoma_sensitivity", "sensitivity"), ("melanoma_specificity", "specificity"),
    ("nevus_flag_rate", "nevi flagged"), ("balanced_accuracy", "balanced acc."),
]


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


def paired_rows(cards: dict[str, list[dict]], baseline: str, key: str = "melanoma_vs_nevus_auc") -> list[str]:
    """Each recipe against ``baseline``, seed by seed (the i-th model of each), per source:
    the mean difference and how many seeds came out ahead. Meaningful when the seeds of
    both recipes shared one split (train --split-seed), so each pair saw the same images."""
    lines = ["| recipe | against | source | seeds | mean difference | seeds ahead |", "|---|---|---|---|---|---|"]
    base_sets = [source_sets(card) for card in cards[baseline]]
    for name, recipe_cards in cards.items():
        if name == baseline:
            continue
        pairs = list(zip((source_sets(card) for card in recipe_cards), base_sets, strict=False))
        for source in sorted(set.intersection(*(set(mine) & set(theirs) for mine, theirs in pairs))):
            differences = [mine[source][key] - theirs[source][key] for mine, theirs in pairs
                           if mine[source].get(key) is not None and theirs[source].get(key) is not None]
            if differences:
                ahead = sum(d > 0 for d in differences)
                lines.append(f"| {name} | {baseline} | {source} | {len(differences)} | "
                             f"{np.mean(differences):+.3f} | {ahead} of {len(differences)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", help='NAME=MODEL[,MODEL...]: the .tflite of each seed of one recipe')
    parser.add_argument("--against", metavar="NAME",
                        help="also compare every recipe with this one, seed by seed (melanoma vs nevus AUC)")
    args = parser.parse_args()
    cards: dict[str, list[dict]] = {}
    for recipe in args.recipes:
        name, _, paths = recipe.partition("=")
        cards[name] = [load_card(Path(path)).document for path in paths.split(",")]
    print(markdown([row for name, recipe_cards in cards.items() for row in seed_rows(name, recipe_cards)]))
    print("\nRows of each recipe run worst source first (by mean melanoma-vs-nevus AUC); "
          "brackets: the lowest and highest seed.")
    if args.against:
        print("\n" + "\n".join(paired_rows(cards, args.against)))


if __name__ == "__main__":
    main()
