"""The fastest a service could go here: the per-file work none can skip, with nothing else.

Two threads (one per core, each with its own one-thread interpreter, as the service's lanes)
take the files of one folder in turn and, for each: claim it (one rename), read it, hash it
(sha256), decode it (the pipeline's read_model_input), classify it, and archive it (one
rename). No database, no observer, no claim folder, no log: the figure the service's own
ratio to the bound (bench/throughput.py) is to be read against. Each run sits between two
measurements of the bound, as in throughput.py.

    python bench/pipeline_floor.py --data ../shared/data/isic9/Train [--count 400] [--runs 4]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from throughput import MAX_PIXELS, make_photos, measure_bound

from dermwatch.modelcard import shipped_model_path
from dermwatch.pipeline.classifier import Classifier
from dermwatch.pipeline.decode import read_model_input
from dermwatch.pipeline.lanes import lane_classifiers


def floor_run(folder: Path, classifiers: list[Classifier]) -> float:
    """images/s of the bare per-file work on every file in ``folder``/intake, one thread per classifier."""
    intake, work, archive = folder / "intake", folder / "work", folder / "archive"
    work.mkdir()
    archive.mkdir()
    names = iter(sorted(os.listdir(intake)))
    turn = threading.Lock()

    def lane(classifier: Classifier) -> None:
        while True:
            with turn:
                name = next(names, None)
            if name is None:
                return
            claimed = work / name
            os.rename(intake / name, claimed)
            data = claimed.read_bytes()
            hashlib.sha256(data).hexdigest()
            classifier.predict(read_model_input(data, classifier.input_size, max_pixels=MAX_PIXELS)[1][None])
            os.rename(claimed, archive / name)

    lanes = [threading.Thread(target=lane, args=(classifier,)) for classifier in classifiers]
    started = time.perf_counter()
    for thread in lanes:
        thread.start()
    for thread in lanes:
        thread.join()
    return len(os.listdir(archive)) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder of data-set JPEGs (searched recursively)")
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="threads, and cores in the bound")
    args = parser.parse_args()
    model = (args.model or shipped_model_path()).resolve()
    classifiers = lane_classifiers(model, args.cores)  # and the switch interval, as the service's lanes

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos = make_photos(args.data, root / "photos", args.count)
        ratios = []
        for index in range(args.runs):
            before = measure_bound(photos, model, args.cores)[2]
            shutil.copytree(root / "photos", root / f"run-{index}" / "intake")
            rate = floor_run(root / f"run-{index}", classifiers)
            after = measure_bound(photos, model, args.cores)[2]
            bound = (before + after) / 2
            ratios.append(rate / bound)
            print(f"run {index + 1}: bound {before:.1f} before, {after:.1f} after; the bare per-file work in "
                  f"{args.cores} threads: {rate:.1f} images/s = {rate / bound:.2f}x the bound")
        print(f"median {statistics.median(ratios):.2f}x the bound (lowest {min(ratios):.2f}x, "
              f"highest {max(ratios):.2f}x) over {args.runs} runs")


if __name__ == "__main__":
    main()
