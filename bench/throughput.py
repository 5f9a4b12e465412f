"""How fast dermwatch classifies full-size photos, against the cost of only decoding them.

Makes 500 full-size JPEGs (1024x768) by upscaling data-set images, then measures:
  1. the decode limit: the same files only decoded and resized to the model input
     (the pipeline's own read_model_input), in one process;
  2. `dermwatch process` on the same files (subprocess; wall time with and without start-up);
  3. `dermwatch run`: time to READY=1, resident memory after READY and at its peak while a
     burst of the same 500 files is classified, and the service's throughput on that burst.

    python bench/throughput.py --data ../shared/data/isic9/Train [--model M.tflite] [--count 500]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from dermwatch.modelcard import load_card, shipped_model_path
from dermwatch.pipeline.decode import read_model_input

FULL_SIZE = (1024, 768)


def make_photos(data: Path, out: Path, count: int, seed: int = 0) -> list[Path]:
    sources = sorted(data.rglob("*.jpg"))
    random.Random(seed).shuffle(sources)
    out.mkdir(parents=True)
    photos = []
    for i, source in enumerate(sources[:count]):
        path = out / f"photo-{i:04d}.jpg"
        Image.open(source).convert("RGB").resize(FULL_SIZE, Image.Resampling.BICUBIC).save(path, "JPEG", quality=92)
        photos.append(path)
    return photos


def decode_limit(photos: list[Path], size: int) -> float:
    started = time.perf_counter()
    for path in photos:
        read_model_input(path.read_bytes(), size, max_pixels=50_000_000)
    return len(photos) / (time.perf_counter() - started)


def write_config(folder: Path, model: Path, threads: int) -> Path:
    config = folder / "config.toml"
    config.write_text(f'[model]\npath = "{model}"\nthreads = {threads}\n[watcher]\nsettle_seconds = 0.5\n')
    return config


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def predictions(db: Path) -> int:
    with sqlite3.connect(db) as connection:
        try:
            return connection.execute("select count(*) from sightings").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder of data-set JPEGs (searched recursively)")
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = (args.model or shipped_model_path()).resolve()
    size = load_card(model).input_size
    dermwatch = [sys.executable, "-m", "dermwatch"]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos = make_photos(args.data, root / "photos", args.count)
        print(f"{len(photos)} JPEGs of {FULL_SIZE[0]}x{FULL_SIZE[1]}, model {model.name} ({size}x{size})")
        print(f"decode limit (decode + resize only): {decode_limit(photos, size):.1f} images/s")

        work = root / "process"
        work.mkdir()
        config = write_config(work, model, args.threads)
        shutil.copytree(root / "photos", work / "batch")
        subprocess.run([*dermwatch, "db", "upgrade", "--config", str(config)], check=True, capture_output=True)
        empty = work / "empty"
        empty.mkdir()
        started = time.perf_counter()
        subprocess.run([*dermwatch, "process", "--config", str(config), str(empty)], check=True, capture_output=True)
        start_up = time.perf_counter() - started
        started = time.perf_counter()
        subprocess.run([*dermwatch, "process", "--config", str(config), str(work / "batch")], check=True,
                       capture_output=True)
        wall = time.perf_counter() - started
        print(f"dermwatch process: {len(photos)} images in {wall:.1f} s = {len(photos) / wall:.1f} images/s "
              f"({len(photos) / (wall - start_up):.1f} images/s without its {start_up:.1f} s start-up)")

        service = root / "service"
        service.mkdir()
        config = write_config(service, model, args.threads)
        notify_path = service / "notify.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(120)
        started = time.perf_counter()
        process = subprocess.Popen([*dermwatch, "run", "--config", str(config)], stderr=subprocess.DEVNULL,
                                   env={**os.environ, "NOTIFY_SOCKET": str(notify_path)})
        while b"READY=1" not in notify.recv(4096):
            pass
        ready = time.perf_counter() - started
        rss_ready = rss_kib(process.pid, "VmRSS")
        intake = service / "var" / "intake"
        started = time.perf_counter()
        for photo in photos:
            shutil.copy(photo, service / photo.name)
            os.rename(service / photo.name, intake / photo.name)
        while predictions(service / "var" / "dermwatch.db") < len(photos):
            time.sleep(0.05)
        burst = time.perf_counter() - started
        peak = rss_kib(process.pid, "VmHWM")
        process.terminate()
        code = process.wait(60)
        print(f"dermwatch run: READY after {ready:.2f} s; resident memory {rss_ready / 1024:.0f} MiB at READY, "
              f"peak {peak / 1024:.0f} MiB; burst of {len(photos)} in {burst:.1f} s = "
              f"{len(photos) / burst:.1f} images/s; exit code {code} on SIGTERM")


if __name__ == "__main__":
    main()
