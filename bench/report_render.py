"""Time to render a day of 1,000 images, and the report's size.

Classifies N data-set images (upscaled to 1024x768, like full-size photos) into a fresh
database with `dermwatch process`, then renders that day's report twice: cold (every
thumbnail and every heatmap computed) and warm (from the cache, as the service's
refreshes are). Optionally takes a screenshot of the page with headless Chromium.

    python bench/report_render.py --data ../shared/data/isic9/Test [--count 1000] [--screenshot docs/report.png]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from throughput import make_photos, write_config

from dermwatch.config import load_settings
from dermwatch.modelcard import shipped_model_path
from dermwatch.pipeline.classifier import load_classifier
from dermwatch.reports.render import Reporter
from dermwatch.store.db import make_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--screenshot", type=Path, default=None)
    args = parser.parse_args()
    model = (args.model or shipped_model_path()).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos = make_photos(args.data, root / "intake-batch", args.count)
        config = write_config(root, model)
        config.write_text(config.read_text() + '[site]\nname = "Benchmark clinic"\n')
        subprocess.run([sys.executable, "-m", "dermwatch", "process", "--config", str(config),
                        str(root / "intake-batch")], check=True, capture_output=True)
        settings = load_settings(config)
        reporter = Reporter(settings, make_engine(settings.database_url), load_classifier(model, threads=2))
        today = datetime.now(settings.reports.timezone).date()
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            rendered = reporter.render(today)
            timings.append(time.perf_counter() - started)
        size = rendered.html.stat().st_size
        print(f"{len(photos)} arrivals = {rendered.images} distinct images ({rendered.flagged} flagged, "
              f"{rendered.rejected} unreadable; the data set repeats some images byte for byte): "
              f"render {timings[0]:.1f} s cold, {timings[1]:.1f} s warm; "
              f"HTML {size / 1e6:.1f} MB, CSV {rendered.csv.stat().st_size / 1e3:.0f} kB, "
              f"JSON {rendered.json.stat().st_size / 1e3:.0f} kB")
        if args.screenshot:
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={root / 'profile'}", "--hide-scrollbars", "--window-size=1100,1700",
                 f"--screenshot={args.screenshot.resolve()}", rendered.html.as_uri()],
                check=True, capture_output=True, timeout=300,
            )
            print(f"screenshot: {args.screenshot}")


if __name__ == "__main__":
    main()
