"""What a training run was started with, kept in its folder so `train --resume` can redo it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from dermwatch.errors import DataError
from dermwatch.training.options import TrainOptions

RUN_START_FILE = "run.json"


@dataclass(frozen=True)
class RunStart:
    data_roots: list[Path]
    ground_truth: Path | None
    options: TrainOptions

    def write(self, run_dir: Path) -> None:
        document = {"data_roots": [str(p.resolve()) for p in self.data_roots],
                    "ground_truth": str(self.ground_truth.resolve()) if self.ground_truth else None,
                    "options": asdict(self.options)}
        (run_dir / RUN_START_FILE).write_text(json.dumps(document, indent=2))

    @classmethod
    def read(cls, run_dir: Path) -> RunStart:
        path = run_dir / RUN_START_FILE
        if not path.exists():
            raise DataError(f"{run_dir} is no training run that can be resumed: it has no {RUN_START_FILE}")
        document = json.loads(path.read_text())
        missing = [p for p in document["data_roots"] + [document["ground_truth"]] if p and not Path(p).exists()]
        if missing:
            raise DataError(f"{run_dir} was trained on {', '.join(missing)}, which no longer exist here")
        return cls([Path(p) for p in document["data_roots"]],
                   Path(document["ground_truth"]) if document["ground_truth"] else None,
                   TrainOptions(**document["options"]))
