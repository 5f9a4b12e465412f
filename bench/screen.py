"""Screen training recipes over seeds: train and export each (recipe, seed), then tabulate.

    python bench/screen.py --out runs/screen \\
        --data ../shared/data/isic9 --data ../shared/data/supplement --data ../shared/data/ham10000 \\
        --ground-truth ../shared/data/isic_ground_truth.csv --external ../shared/data/derm7pt \\
        --common "--input-size 96 --epochs 12 --epoch-images 2816 --balance class-and-source --split-seed 0" \\
        --seeds 0,1,2 "base=" "luminance=--colour luminance" "crop=--crop lesion"

Runs go seed by seed (every recipe's seed 0 first), so a screen cut short still compares
recipes on the same seeds. A run whose exported card exists is not run again: start the
same command again to resume. The table at the end is bench/seeds.py's: every source
(each --data root's validation images, each --external clinic), mean and range over the
seeds, worst source first; then each recipe against the first, seed by seed. Each step's
output goes to <out>/<recipe>-s<seed>.log.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from seeds import markdown, paired_rows, seed_rows

from dermwatch.modelcard import load_card

CARD = Path("export") / "dermwatch-float32.tflite"
#: The last file `dermwatch export` writes: a run that has it is done.
EXPORTED = Path("export") / "dermwatch-int8.html"


def run_one(name: str, flags: str, seed: int, args: argparse.Namespace) -> Path:
    """Train and export one recipe at one seed (unless done before); its float32 model."""
    run_dir = args.out / f"{name}-s{seed}"
    model = run_dir / CARD
    if (run_dir / EXPORTED).is_file():
        return model
    dermwatch = [sys.executable, "-m", "dermwatch"]
    data = [part for root in args.data for part in ("--data", str(root))]
    train = [*dermwatch, "train", *data, "--ground-truth", str(args.ground_truth), "--out", str(run_dir),
             "--seed", str(seed), *shlex.split(args.common), *shlex.split(flags)]
    export = [*dermwatch, "export", str(run_dir),
              *[part for root in args.external for part in ("--external", str(root))]]
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / f"{name}-s{seed}.log").open("a") as log:
        for command in (train, export):
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="one folder per (recipe, seed) goes here")
    parser.add_argument("--data", type=Path, action="append", required=True)
    parser.add_argument("--ground-truth", type=Path, required=True)
    parser.add_argument("--external", type=Path, action="append", default=[])
    parser.add_argument("--common", default="", help="train options every recipe shares")
    parser.add_argument("--seeds", type=lambda text: [int(seed) for seed in text.split(",")], default=[0, 1, 2],
                        help="comma-separated (default 0,1,2)")
    parser.add_argument("recipes", nargs="+", help='NAME=TRAIN OPTIONS, e.g. "luminance=--colour luminance"')
    args = parser.parse_args()
    recipes = [recipe.partition("=")[::2] for recipe in args.recipes]
    models: dict[str, list[Path]] = {name: [] for name, _ in recipes}
    for seed in args.seeds:
        for name, flags in recipes:
            models[name].append(run_one(name, flags, seed, args))
            print(f"{name} seed {seed}: {models[name][-1]}", flush=True)
    cards = {name: [load_card(path).document for path in paths] for name, paths in models.items()}
    print(markdown([row for name, recipe_cards in cards.items() for row in seed_rows(name, recipe_cards)]))
    print("\n" + "\n".join(paired_rows(cards, recipes[0][0])))


if __name__ == "__main__":
    main()
