"""A recipe's figures per source over its seeds (mean and range), worst source first.

One seed on a source of 15 melanomas is noise: recipes are judged by this table, and the
shipped card carries it so that its own row stands among the recipes it was chosen from.
"""

from __future__ import annotations

import numpy as np

from dermwatch.training.metrics import defined

#: The sets of a card that are one source each: a --data root's validation images, or another
#: clinic's (the pooled validation and Test sets are not).
SOURCE_PREFIXES = ("validation:", "external:")

#: (card key, column title) of each figure in the table, the deciding one first.
SEED_METRICS = [
    ("melanoma_vs_nevus_auc", "melanoma vs nevus AUC"), ("melanoma_roc_auc", "melanoma AUC"),
    ("melanoma_sensitivity", "sensitivity"), ("melanoma_specificity", "specificity"),
    ("nevus_flag_rate", "nevi flagged"), ("balanced_accuracy", "balanced acc."),
]

#: A figure over seeds: (mean, lowest seed, highest seed), or None where no seed has it.
Spread = tuple[float, float, float] | None


def source_sets(card: dict) -> dict[str, dict]:
    """The card's sets that are one source each (a --data root's validation, another clinic)."""
    return {name: metrics for name, metrics in card["evaluation"]["sets"].items() if name.startswith(SOURCE_PREFIXES)}


def seed_rows(recipe: str, cards: list[dict]) -> list[dict]:
    """One row per source that every seed's card scored, worst melanoma-vs-nevus AUC first."""
    per_seed = [source_sets(card) for card in cards]
    sources = set.intersection(*(set(sets) for sets in per_seed))
    rows = []
    for source in sources:
        row: dict = {"recipe": recipe, "source": source, "seeds": len(cards),
                     "images": round(float(np.mean([sets[source]["images"] for sets in per_seed])))}
        for key, _ in SEED_METRICS:
            values = [sets[source][key] for sets in per_seed if defined(sets[source].get(key))]
            row[key] = (float(np.mean(values)), min(values), max(values)) if values else None
        rows.append(row)
    return sorted(rows, key=lambda r: r["melanoma_vs_nevus_auc"][0] if r["melanoma_vs_nevus_auc"] else 1.0)


def merge_rows(stored: list[dict], new: list[dict]) -> list[dict]:
    """The card's table with ``new``'s recipes put in: each recipe measured again replaces its
    own rows where they stood, new recipes follow, and every other recipe's rows stay as they
    are, since their seeds' files need not exist any more (run folders do not outlive a machine)."""
    new_by_recipe: dict[str, list[dict]] = {}
    for row in new:
        new_by_recipe.setdefault(row["recipe"], []).append(row)
    merged: list[dict] = []
    placed: set[str] = set()
    for row in stored:
        recipe = row["recipe"]
        if recipe not in new_by_recipe:
            merged.append(row)
        elif recipe not in placed:
            merged.extend(new_by_recipe[recipe])
            placed.add(recipe)
    return merged + [row for row in new if row["recipe"] not in placed]


def spread_text(value: Spread) -> str:
    """'0.385 (0.366–0.406)': the mean and, when the seeds differ, the lowest and highest."""
    if value is None:
        return "n/a"
    mean, low, high = value
    return f"{mean:.3f}" if low == high else f"{mean:.3f} ({low:.3f}–{high:.3f})"
