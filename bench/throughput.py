"""How fast dermwatch classifies full-size photos, against what the hardware allows.

Makes full-size JPEGs (1024x768) by upscaling data-set images, then measures on those files:
  1. the bound: CORES / (decode + one-thread inference), each timed alone on every file
     (the pipeline's own read_model_input, and the model through a one-thread LiteRT
     interpreter, one image per call). Measured before and after the service, as the
     machine's speed drifts; the ratio is to their mean;
  2. `dermwatch run` on SQLite: all files land in the intake folder at once (renamed in
     from a staging folder on the same file system); images/s from the first landing to the
     last commit, the ratio to the bound, and resident memory at READY and at its peak
     (VmHWM). With --runs N, N times, each between its own two bound measurements, and the
     median ratio;
  3. `dermwatch process` on the same files;
  4. with --postgres: two `dermwatch run` workers on one config sharing a throwaway
     PostgreSQL server (started as in the tests), the same burst.

    python bench/throughput.py --data ../shared/data/isic9/Train [--count 400] [--runs 5] [--postgres]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from sqlalchemy import create_engine, text

from dermwatch.modelcard import shipped_model_path
from dermwatch.pipeline.classifier import load_classifier
from dermwatch.pipeline.decode import read_model_input

FULL_SIZE = (1024, 768)
MAX_PIXELS = 50_000_000


def make_photos(data: Path, out: Path, count: int, seed: int = 0) -> list[Path]:
    sources = sorted(data.rglob("*.jpg"))
    random.Random(seed).shuffle(sources)
    out.mkdir(parents=True)
    photos = []
    for i, source in enumerate(sources[:count]):
        path = out / f"photo-{i:04d}.jpg"
        # The comment makes every file distinct, even where the data set holds the same photo twice.
        Image.open(source).convert("RGB").resize(FULL_SIZE, Image.Resampling.BICUBIC).save(
            path, "JPEG", quality=92, comment=f"dermwatch bench photo {i}")
        photos.append(path)
    return photos


def per_image_seconds(step: Callable[[object], object], inputs: list, warm_up: int = 10) -> float:
    for value in inputs[:warm_up]:
        step(value)
    started = time.perf_counter()
    for value in inputs:
        step(value)
    return (time.perf_counter() - started) / len(inputs)


def measure_bound(photos: list[Path], model: Path, cores: int) -> tuple[float, float, float]:
    """(decode s, one-thread inference s, bound images/s) on these files."""
    classifier = load_classifier(model, threads=1)
    size = classifier.input_size
    data = [path.read_bytes() for path in photos]
    decode = per_image_seconds(lambda d: read_model_input(d, size, max_pixels=MAX_PIXELS), data)
    pixels = [read_model_input(d, size, max_pixels=MAX_PIXELS)[1][None] for d in data]
    inference = per_image_seconds(classifier.predict, pixels)
    return decode, inference, cores / (decode + inference)


def _decode_and_classify(model: Path, photos: list[Path]) -> float:
    """Seconds for one process to decode and classify ``photos`` (after a warm-up)."""
    classifier = load_classifier(model, threads=1)
    data = [path.read_bytes() for path in photos]
    def step(d: bytes) -> object:
        return classifier.predict(read_model_input(d, classifier.input_size, max_pixels=MAX_PIXELS)[1][None])
    return per_image_seconds(step, data) * len(data)


def measure_together(photos: list[Path], model: Path, cores: int) -> float:
    """images/s of ``cores`` processes decoding and classifying at once: what the cores give
    in parallel (shared caches, memory, the host), with no service and no GIL in the way."""
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        seconds = pool.starmap(_decode_and_classify, [(model, photos)] * cores)
    return cores * len(photos) / max(seconds)


def write_config(folder: Path, model: Path, database_url: str | None = None) -> Path:
    config = folder / "config.toml"
    database = f'[database]\nurl = "{database_url}"\n' if database_url else ""
    config.write_text(f'[model]\npath = "{model}"\n[watcher]\nsettle_seconds = 0.5\n{database}')
    return config


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


class Services:
    """`dermwatch run` processes on one config, each waited for until READY=1."""

    def __init__(self, folder: Path, config: Path, count: int) -> None:
        self.processes = []
        for index in range(count):
            notify_path = folder / f"notify-{index}.sock"
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            notify.bind(str(notify_path))
            notify.settimeout(120)
            process = subprocess.Popen([sys.executable, "-m", "dermwatch", "run", "--config", str(config)],
                                       stderr=subprocess.DEVNULL, env={**os.environ, "NOTIFY_SOCKET": str(notify_path)})
            while b"READY=1" not in notify.recv(4096):
                pass
            notify.close()
            self.processes.append(process)
        self.ready_kib = [memory_kib(p.pid, "VmRSS") for p in self.processes]

    def peak_kib(self) -> list[int]:
        return [memory_kib(p.pid, "VmHWM") for p in self.processes]

    def stop(self) -> list[int]:
        for process in self.processes:
            process.terminate()
        return [process.wait(60) for process in self.processes]


def burst(photos: list[Path], folder: Path, database_url: str) -> float:
    """Land every photo in the intake folder at once; seconds until the last one is committed."""
    staging, intake = folder / "staging", folder / "var" / "intake"
    shutil.copytree(photos[0].parent, staging)
    engine = create_engine(database_url)
    started = time.perf_counter()
    for photo in photos:
        os.rename(staging / photo.name, intake / photo.name)
    with engine.connect() as connection:
        while connection.execute(text("select count(*) from sightings")).scalar_one() < len(photos):
            connection.rollback()
            time.sleep(0.02)
    elapsed = time.perf_counter() - started
    engine.dispose()
    return elapsed


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service_run(photos: list[Path], folder: Path, model: Path, workers: int = 1,
                database_url: str | None = None) -> tuple[float, list[int], list[int], list[int], float]:
    """(images/s, resident KiB at READY, peak KiB, exit codes, CPU s per image) for ``workers`` services.

    The CPU time is the services' own (their start-up excluded), from the first landing until
    the last commit was seen.
    """
    folder.mkdir()
    config = write_config(folder, model, database_url)
    services = Services(folder, config, workers)
    try:
        cpu_before = sum(cpu_seconds(p.pid) for p in services.processes)
        seconds = burst(photos, folder, database_url or f"sqlite:///{folder / 'var' / 'dermwatch.db'}")
        cpu = sum(cpu_seconds(p.pid) for p in services.processes) - cpu_before
        peak = services.peak_kib()
    finally:
        codes = services.stop()
    return len(photos) / seconds, services.ready_kib, peak, codes, cpu / len(photos)


def process_run(photos: list[Path], folder: Path, model: Path) -> float:
    folder.mkdir()
    config = write_config(folder, model)
    shutil.copytree(photos[0].parent, folder / "batch")
    dermwatch = [sys.executable, "-m", "dermwatch"]
    subprocess.run([*dermwatch, "db", "upgrade", "--config", str(config)], check=True, capture_output=True)
    started = time.perf_counter()
    subprocess.run([*dermwatch, "process", "--config", str(config), str(folder / "batch")], check=True,
                   capture_output=True)
    return len(photos) / (time.perf_counter() - started)


def mib(kib: list[int]) -> str:
    return ", ".join(f"{k / 1024:.0f}" for k in kib) + " MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder of data-set JPEGs (searched recursively)")
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="cores in the bound (default: all)")
    parser.add_argument("--runs", type=int, default=1,
                        help="service runs, each between two measurements of the bound: on shared cores the "
                             "bound moves by a quarter from one minute to the next, so read the median")
    parser.add_argument("--postgres", action="store_true",
                        help="also run two workers on a throwaway PostgreSQL server (needs Debian's postgresql)")
    args = parser.parse_args()
    model = (args.model or shipped_model_path()).resolve()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos = make_photos(args.data, root / "photos", args.count)
        print(f"{len(photos)} JPEGs of {FULL_SIZE[0]}x{FULL_SIZE[1]}, model {model.name}, {args.cores} cores")
        ratios = []
        for index in range(args.runs):
            decode, inference, before = measure_bound(photos, model, args.cores)
            rate, ready, peak, codes, cpu = service_run(photos, root / f"service-{index}", model)
            decode_after, inference_after, after = measure_bound(photos, model, args.cores)
            bound = (before + after) / 2
            ratios.append(rate / bound)
            print(f"run {index + 1}: bound {args.cores} / (decode {decode * 1e3:.2f} ms + one-thread inference "
                  f"{inference * 1e3:.2f} ms) = {before:.1f} images/s before the service, {after:.1f} after "
                  f"(decode {decode_after * 1e3:.2f} ms, inference {inference_after * 1e3:.2f} ms); mean {bound:.1f}")
            print(f"  dermwatch run (SQLite): {rate:.1f} images/s = {rate / bound:.2f}x the bound; resident memory "
                  f"{mib(ready)} at READY, peak {mib(peak)}; exit code {codes[0]} on SIGTERM")
            work = args.cores / bound  # decode + inference, the mean of both measurements
            print(f"  its CPU: {cpu * 1e3:.2f} ms per image, against {work * 1e3:.2f} ms of decode and inference; "
                  f"the cores were busy {cpu * rate / args.cores:.0%} of the burst")
        if args.runs > 1:
            print(f"dermwatch run over {args.runs} runs: median {statistics.median(ratios):.2f}x the bound "
                  f"(lowest {min(ratios):.2f}x, highest {max(ratios):.2f}x)")
        together = measure_together(photos, model, args.cores)
        print(f"{args.cores} processes decoding and classifying at once, no service: {together:.1f} images/s = "
              f"{together / bound:.2f}x the last run's bound; that run's service is {rate / together:.2f}x that")
        print(f"dermwatch process: {process_run(photos, root / 'process', model):.1f} images/s (with start-up)")
        if args.postgres:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.postgres_server import PostgresServer

            server = PostgresServer()
            try:
                rate, ready, peak, codes, _ = service_run(photos, root / "workers", model, workers=2,
                                                       database_url=server.new_database())
            finally:
                server.stop()
            print(f"2 dermwatch run workers (PostgreSQL): {rate:.1f} images/s together = {rate / bound:.2f}x the "
                  f"one-machine bound; resident memory {mib(ready)} at READY, peak {mib(peak)}; "
                  f"exit codes {codes} on SIGTERM")


if __name__ == "__main__":
    main()
