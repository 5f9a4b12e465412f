"""Shared fixtures: a tiny real TFLite model, a config in a temporary folder, test images."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image
from planted_data import plant_data_set
from sqlalchemy import create_engine

from dermwatch.config import Settings, load_settings
from dermwatch.store.queries import counts

TINY_INPUT = 32


def _tiny_tflite(folder: Path, melanoma_threshold: float) -> Path:
    import keras

    from dermwatch.training.export import card_document, convert, inference_graph, save_tflite, with_probabilities
    from dermwatch.training.model import build_model

    keras.utils.set_random_seed(0)
    model = with_probabilities(build_model("dermnet", TINY_INPUT, width=4), temperature=1.0)
    document = card_document(name="tiny-test-model", version="test", input_size=TINY_INPUT,
                             melanoma_threshold=melanoma_threshold, quantization="float32")
    with inference_graph(model) as graph:
        return save_tflite(convert(graph), folder / "tiny.tflite", document)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained but real network, converted to TFLite by the project's export code."""
    return _tiny_tflite(tmp_path_factory.mktemp("model"), melanoma_threshold=0.5)


@pytest.fixture(scope="session")
def flag_everything_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same network with an alert threshold so low that every image is flagged."""
    return _tiny_tflite(tmp_path_factory.mktemp("model-flags-all"), melanoma_threshold=1e-6)


@pytest.fixture
def planted(tmp_path: Path) -> dict[str, Path]:
    """A small data set with every defect the real one has, for a test that may change it."""
    return plant_data_set(tmp_path)


@pytest.fixture(scope="session")
def planted_once(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same data set, made once for the tests that only read it."""
    return plant_data_set(tmp_path_factory.mktemp("planted"))


#: A tiny dermnet run: 3 epochs of 2 steps at 32 px, on split 5.
TINY_RUN = ("--epochs", "3", "--input-size", "32", "--backbone", "dermnet", "--width", "4", "--batch-size", "16",
            "--epoch-images", "32", "--split-seed", "5")


def train_tiny(run_dir: Path, planted: dict[str, Path], *extra: str) -> Result:
    """`dermwatch train` with TINY_RUN on ``planted``; ``extra`` options are added after it."""
    from dermwatch.cli import cli

    return CliRunner().invoke(cli, ["train", "--data", str(planted["root"]), "--ground-truth",
                                    str(planted["truth"]), "--out", str(run_dir), *TINY_RUN, *extra])


class TrainedRun(NamedTuple):
    run_dir: Path
    output: str  # what `dermwatch train` printed and logged


@pytest.fixture(scope="session")
def two_seeds(planted_once: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[TrainedRun]:
    """Seeds 5 and 6 of TINY_RUN on planted_once, trained once for the session (training
    dominates the suite's time): the resume test stops and resumes seed 5 against it, the
    ensemble test averages the two. Tests read these runs and never change them. Each
    pytest-xdist worker is a session of its own, so the tests that use it share the
    xdist_group "two_seeds" (one worker)."""
    runs = []
    for seed in (5, 6):
        run_dir = tmp_path_factory.mktemp(f"seed{seed}")
        result = train_tiny(run_dir, planted_once, "--seed", str(seed))
        assert result.exit_code == 0, result.output
        runs.append(TrainedRun(run_dir, result.output))
    return runs


@pytest.fixture
def config_file(tmp_path: Path, tiny_model: Path) -> Path:
    """A config.toml whose folders and database all live under tmp_path."""
    path = tmp_path / "config.toml"
    (tmp_path / "intake").mkdir()  # as a clinic's IT makes it: a configured intake must exist
    path.write_text(
        f"""
[paths]
intake = "intake"
state = "state"
reports = "reports"
[database]
url = "sqlite:///dermwatch.db"
[model]
path = "{tiny_model}"
threads = 1
[watcher]
settle_seconds = 0.5
rescan_seconds = 2
"""
    )
    return path


@pytest.fixture
def settings(config_file: Path) -> Settings:
    return load_settings(config_file)


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (96, 72), **save_options) -> Path:
    """A random-noise JPEG: every seed gives different bytes."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, "JPEG", **save_options)
    return path


def totals(settings: Settings) -> dict[str, int]:
    engine = create_engine(settings.database_url)
    try:
        return counts(engine)
    finally:
        engine.dispose()


def status_json(config_file: Path) -> dict:
    """`dermwatch status --json` as a user would run it (it exits 1 while the model is unusable,
    and still prints its JSON)."""
    result = subprocess.run([sys.executable, "-m", "dermwatch", "status", "--json", "--config", str(config_file)],
                            capture_output=True, text=True, timeout=60)
    return json.loads(result.stdout)


def wait_until(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s: {message}")


class Service:
    """`dermwatch run` in a subprocess, with a real NOTIFY_SOCKET to hear READY=1 from it.

    A thread reads the socket all along, as systemd does: a datagram socket holds only a few
    messages, and the service drops what does not fit rather than wait."""

    def __init__(self, config_file: Path, log_path: Path, *, prefix: tuple[str, ...] = (),
                 umask: int | None = None) -> None:
        self.notify_path = config_file.parent / f"notify-{time.monotonic_ns()}.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        os.chmod(self.notify_path, 0o777)
        self.messages: list[str] = []
        self.ready = threading.Event()
        self.closed = threading.Event()
        threading.Thread(target=self._listen, daemon=True).start()
        self.log_path = log_path
        self.log = log_path.open("ab")
        # A 2 s watchdog: the service then sends WATCHDOG=1 and its STATUS= line every second.
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), "WATCHDOG_USEC": "2000000"}
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "dermwatch", "run", "--config", str(config_file)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=None if umask is None else (lambda: os.umask(umask)),
        )

    def _listen(self) -> None:
        self.notify.settimeout(0.2)
        while not self.closed.is_set():
            try:
                message = self.notify.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            self.messages.append(message)
            if "READY=1" in message.split("\n"):
                self.ready.set()

    def wait_ready(self, timeout: float = 60) -> None:
        if not self.ready.wait(timeout):
            raise AssertionError("service sent no READY=1")

    def lines(self) -> list[str]:
        """Every line of every message the service has sent so far."""
        return [line for message in list(self.messages) for line in message.split("\n")]

    def statuses(self) -> list[str]:
        """Every STATUS= the service has sent so far."""
        return [line[len("STATUS="):] for line in self.lines() if line.startswith("STATUS=")]

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        code = self.process.wait(timeout)
        self.close()
        return code

    def close(self) -> None:
        self.closed.set()
        self.notify.close()
        self.notify_path.unlink(missing_ok=True)
        self.log.close()

    def discard(self) -> None:
        """After a test, pass or fail: kill the service if it still runs, and close what it held."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if not self.log.closed:
            self.close()


@pytest.fixture
def start_service(config_file: Path, tmp_path: Path) -> Iterator[Callable[[], Service]]:
    started: list[Service] = []

    def start(**options) -> Service:
        service = Service(config_file, tmp_path / "service.log", **options)
        started.append(service)
        service.wait_ready()
        return service

    yield start
    for service in started:
        service.discard()


@pytest.fixture(scope="session")
def postgres_server():
    from postgres_server import MISSING, PostgresServer

    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise AssertionError(MISSING) from None
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that takes it runs on the embedded SQLite file and on a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/dermwatch.db"
    return request.getfixturevalue("postgres_server").new_database()


@pytest.fixture
def any_database_config(config_file: Path, database_url: str) -> Path:
    """config_file, on the database of ``database_url`` (SQLite and PostgreSQL in turn)."""
    config_file.write_text(config_file.read_text().replace('url = "sqlite:///dermwatch.db"', f'url = "{database_url}"'))
    return config_file
