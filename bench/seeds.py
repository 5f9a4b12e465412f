"""Per-source figures of a recipe over its seeds, worst source first, from the exported cards.

    python bench/seeds.py \\
        "v15=runs/v15-s0/export/dermwatch-float32.tflite,runs/v15-s1/export/dermwatch-float32.tflite,..." \\
        "shipped=dermwatch/models/dermwatch.tflite" [--against shipped]

Each recipe is a name and the models its seeds trained (each scored by `dermwatch export`,
with --external for another clinic). For every source a card scores (each --data root's
validation images, each external clinic) the table gives the mean over the seeds and the
range, so a recipe is judged on its worst source and not on one lucky seed. Seeds trained
with one --split-seed share their validation images (the spread is training's noise);
otherwise each seed draws its own split and the spread holds the split's noise too.
With --card the table is put into that model's card, whose HTML shows it: the rows of the
recipes named here replace their old rows, and the card's other recipes keep theirs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dermwatch.modelcard import load_card
from dermwatch.training.export import write_card_and_html
from dermwatch.training.seed_table import SEED_METRICS, merge_rows, seed_rows, source_sets, spread_text


def markdown(rows: list[dict]) -> str:
    header = ["recipe", "source", "seeds", "images", *[title for _, title in SEED_METRICS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["recipe"], row["source"], str(row["seeds"]), str(row["images"]),
                 *[spread_text(row[key]) for key, _ in SEED_METRICS]]
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
    parser.add_argument("--card", type=Path, metavar="MODEL",
                        help="put the table into this model's card (field seed_table: these recipes' rows replace "
                             "their old ones, other recipes' stay) and render its HTML again")
    args = parser.parse_args()
    cards: dict[str, list[dict]] = {}
    for recipe in args.recipes:
        name, _, paths = recipe.partition("=")
        cards[name] = [load_card(Path(path)).document for path in paths.split(",")]
    rows = [row for name, recipe_cards in cards.items() for row in seed_rows(name, recipe_cards)]
    print(markdown(rows))
    print("\nRows of each recipe run worst source first (by mean melanoma-vs-nevus AUC); "
          "brackets: the lowest and highest seed.")
    if args.against:
        print("\n" + "\n".join(paired_rows(cards, args.against)))
    if args.card:
        document = load_card(args.card).document
        document["seed_table"] = merge_rows(document.get("seed_table", []), rows)
        write_card_and_html(args.card, document)
        print(f"\nstored in {args.card}'s card and {args.card.with_suffix('.html')}")


if __name__ == "__main__":
    main()
