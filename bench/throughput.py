"""How fast dermwatch classifies full-size photos, against what the hardware allows.

Makes full-size JPEGs (1024x768) by upscaling data-set images, then measures on those files:
  1. the floor: CORES bare processes, each with a one-thread LiteRT interpreter, that take
     the files of one folder and for each claim it (one rename), read it, hash it (sha256),
     decode it (the pipeline's read_model_input, draft mode) and classify it, and archive it
     (one rename): the per-file work no service can skip, with nothing else. Measured before
     and after the service, as the machine's speed drifts; the service's ratio is to their mean;
  2. `dermwatch run` on SQLite: all files land in the intake folder at once (renamed in
     from a staging folder on the same file system); images/s from the first landing to the
     last commit, the ratio to the floor, and resident memory at READY and at its peak
     (VmHWM). With --runs N, N times, each between its own two floor measurements, and the
     median ratio. The bound, CORES / (decode + one-thread inference, each timed alone),
     is printed beside it;
  3. `dermwatch process` on the same files;
  4. with --report: one more `dermwatch run` whose day's report (every thumbnail, a heatmap
     per flagged image) is written right after the burst: its peak memory with the report;
  5. with --postgres: two `dermwatch run` workers on one config sharing a throwaway
     PostgreSQL server (started as in the tests), the same burst.

    python bench/throughput.py --data ../shared/data/isic9/Train [--count 400] [--runs 5] [--report] [--postgres]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import multiprocessing.synchronize
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

import numpy as np
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


def _floor_lane(model: Path, folder: Path, ready: multiprocessing.synchronize.Barrier) -> None:
    """One bare lane of the floor: claim, read, hash, decode, classify, archive, until no file is left."""
    classifier = load_classifier(model, threads=1)
    size = classifier.input_size
    classifier.predict(np.zeros((1, size, size, 3), np.uint8))  # warm up before the clock starts
    intake, work, archive = folder / "intake", folder / "work", folder / "archive"
    ready.wait()
    for name in sorted(os.listdir(intake)):
        claimed = work / name
        try:
            os.rename(intake / name, claimed)
        except FileNotFoundError:
            continue  # the other lane claimed it first
        data = claimed.read_bytes()
        hashlib.sha256(data).hexdigest()
        classifier.predict(read_model_input(data, size, max_pixels=MAX_PIXELS)[1][None])
        os.rename(claimed, archive / name)


def measure_floor(photos: list[Path], folder: Path, model: Path, cores: int) -> float:
    """images/s of ``cores`` bare processes doing the per-file work on every photo, from the
    moment all of them are ready until the last file is archived."""
    shutil.copytree(photos[0].parent, folder / "intake")
    (folder / "work").mkdir()
    (folder / "archive").mkdir()
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(cores + 1)
    lanes = [context.Process(target=_floor_lane, args=(model, folder, ready)) for _ in range(cores)]
    for lane in lanes:
        lane.start()
    ready.wait()
    started = time.perf_counter()
    for lane in lanes:
        lane.join()
    elapsed = time.perf_counter() - started
    archived = len(os.listdir(folder / "archive"))
    if archived != len(photos) or any(lane.exitcode for lane in lanes):
        raise RuntimeError(f"the floor archived {archived} of {len(photos)} photos")
    return archived / elapsed


#: For --report: the day's report is written 1 s after the burst, its pictures on a whole core.
REPORT_SOON = "[reports]\nquiet_seconds = 1.0\ncpu_share = 1.0\n"


def write_config(folder: Path, model: Path, database_url: str | None = None, extra: str = "") -> Path:
    config = folder / "config.toml"
    database = f'[database]\nurl = "{database_url}"\n' if database_url else ""
    config.write_text(f'[model]\npath = "{model}"\n[watcher]\nsettle_seconds = 0.5\n{database}{extra}')
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


def report_run(photos: list[Path], folder: Path, model: Path, timeout: float = 3600.0) -> tuple[int, int, float]:
    """(peak KiB after the burst, peak KiB once the day's report lists every photo, seconds from
    the last commit to that report) for one `dermwatch run` on SQLite: what a clinic's service
    holds when the report after a burst draws every thumbnail and every flagged image's heatmap."""
    folder.mkdir()
    services = Services(folder, write_config(folder, model, extra=REPORT_SOON), 1)
    try:
        burst(photos, folder, f"sqlite:///{folder / 'var' / 'dermwatch.db'}")
        after_burst = services.peak_kib()[0]
        started = time.perf_counter()
        reports = folder / "var" / "reports"
        while _reported_images(reports) < len(photos):
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"no report listed all {len(photos)} photos within {timeout:.0f} s")
            time.sleep(0.5)
        return after_burst, services.peak_kib()[0], time.perf_counter() - started
    finally:
        services.stop()


def _reported_images(reports: Path) -> int:
    """Images in the newest day's JSON report (0 before there is one, or while it is replaced)."""
    days = sorted(reports.glob("????-??-??.json"))
    try:
        return int(json.loads(days[-1].read_text())["images"]) if days else 0
    except (OSError, ValueError, KeyError):
        return 0


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
    parser.add_argument("--cores", type=int, default=os.cpu_count(),
                        help="processes in the floor, cores in the bound (default: all)")
    parser.add_argument("--runs", type=int, default=1,
                        help="service runs, each between two measurements of the floor: on shared cores the "
                             "speed moves by a quarter from one minute to the next, so read the median")
    parser.add_argument("--report", action="store_true",
                        help="also one service run that writes the day's report after the burst (thumbnails, "
                             "heatmaps of the flagged images), for its peak memory")
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
            floor_before = measure_floor(photos, root / f"floor-{index}-before", model, args.cores)
            rate, ready, peak, codes, cpu = service_run(photos, root / f"service-{index}", model)
            floor_after = measure_floor(photos, root / f"floor-{index}-after", model, args.cores)
            floor = (floor_before + floor_after) / 2
            decode, inference, bound = measure_bound(photos, model, args.cores)
            ratios.append(rate / floor)
            print(f"run {index + 1}: floor ({args.cores} bare processes) {floor_before:.1f} images/s before the "
                  f"service, {floor_after:.1f} after; mean {floor:.1f}")
            print(f"  dermwatch run (SQLite): {rate:.1f} images/s = {rate / floor:.2f}x the floor; resident memory "
                  f"{mib(ready)} at READY, peak {mib(peak)}; exit code {codes[0]} on SIGTERM")
            print(f"  bound {args.cores} / (decode {decode * 1e3:.2f} ms + one-thread inference "
                  f"{inference * 1e3:.2f} ms) = {bound:.1f} images/s: the floor is {floor / bound:.2f}x it, the "
                  f"service {rate / bound:.2f}x; the service's CPU {cpu * 1e3:.2f} ms per image")
        if args.runs > 1:
            print(f"dermwatch run over {args.runs} runs: median {statistics.median(ratios):.2f}x the floor "
                  f"(lowest {min(ratios):.2f}x, highest {max(ratios):.2f}x)")
        print(f"dermwatch process: {process_run(photos, root / 'process', model):.1f} images/s (with start-up)")
        if args.report:
            after_burst, with_report, seconds = report_run(photos, root / "report", model)
            print(f"dermwatch run, then the day's report ({seconds:.0f} s after the last commit): peak "
                  f"{mib([after_burst])} after the burst, {mib([with_report])} once the report is written")
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
