"""Two workers on one PostgreSQL database, one killed mid-burst: is every image classified once
and alerted once?

Starts a throwaway PostgreSQL server (as the tests do), two `dermwatch run` workers on one
config with an alert command that appends each alerted image id to a file, lands --count
full-size JPEGs in the intake folder at once, kills one worker with SIGKILL after --kill-after
seconds and never restarts it. Then waits for the survivor to finish, and checks:
`status --json` images = predictions = count, one alert per flagged image, nothing left in
intake or work, and the survivor's exit code on SIGTERM.

    python bench/workers_kill.py --data ../shared/data/isic9/Train [--count 600] [--kill-after 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.throughput import Services, make_photos  # noqa: E402
from tests.postgres_server import PostgresServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder of data-set JPEGs (searched recursively)")
    parser.add_argument("--count", type=int, default=600)
    parser.add_argument("--kill-after", type=float, default=2.0)
    args = parser.parse_args()

    server = PostgresServer()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            photos = make_photos(args.data, root / "photos", args.count)
            url = server.new_database()
            alerted = root / "alerted.txt"
            config = root / "config.toml"
            config.write_text(f'[database]\nurl = "{url}"\n[alerts]\n'
                              f'command = "sh -c \'echo $DERMWATCH_IMAGE_ID >> {alerted}\'"\n')
            services = Services(root, config, 2)
            victim, survivor = services.processes
            shutil.copytree(root / "photos", root / "staging")
            started = time.perf_counter()
            for photo in photos:
                os.rename(root / "staging" / photo.name, root / "var" / "intake" / photo.name)
            time.sleep(args.kill_after)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            engine = create_engine(url)
            with engine.connect() as connection:
                while connection.execute(text("select count(*) from sightings")).scalar_one() < len(photos):
                    connection.rollback()
                    time.sleep(0.2)
                    if time.perf_counter() - started > 600:
                        sys.exit("gave up after 600 s")
                done = time.perf_counter() - started
                flagged = connection.execute(text("select count(*) from predictions where flagged")).scalar_one()
            time.sleep(5)  # room for the last alerts, and for a second alert were there one
            status = json.loads(subprocess.run(
                [sys.executable, "-m", "dermwatch", "status", "--json", "--config", str(config)],
                capture_output=True, text=True, check=True).stdout)
            alerts = Counter(alerted.read_text().split()) if alerted.exists() else Counter()
            left = [p for folder in ("intake", "state/work") for p in (root / "var" / folder).rglob("*") if p.is_file()]
            code = survivor.send_signal(signal.SIGTERM) or survivor.wait(60)
            engine.dispose()
            print(f"{len(photos)} images landed; worker {victim.pid} killed after {args.kill_after:g} s; "
                  f"all committed after {done:.1f} s")
            print(f"status: images {status['images']}, predictions {status['predictions']}; flagged {flagged}, "
                  f"alerted {len(alerts)} distinct, {sum(alerts.values())} in all "
                  f"(most for one image: {max(alerts.values(), default=0)})")
            print(f"left in intake or work: {len(left)}; survivor exit code on SIGTERM: {code}")
            ok = (status["images"] == status["predictions"] == len(photos) and len(alerts) == flagged
                  and sum(alerts.values()) == flagged and not left and code == 0)
            print("PASS" if ok else "FAIL")
            sys.exit(0 if ok else 1)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
