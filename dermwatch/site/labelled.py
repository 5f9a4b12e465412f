"""A site's own labelled photos, for `dermwatch calibrate`: a folder with one subfolder per
diagnosis, or a CSV with columns path,diagnosis."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dermwatch.errors import DataError
from dermwatch.labels import parse_diagnosis
from dermwatch.pipeline.claim import iter_candidates
from dermwatch.site.tables import read_table


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    diagnosis: str  # one of labels.CLASS_NAMES


@dataclass(frozen=True)
class Labelled:
    images: list[LabelledImage]
    unused: list[Path]  # files beside the diagnosis folders (a labels.csv, a README): said, not read


def read_labelled(source: Path) -> Labelled:
    """Every labelled image under ``source``; any unknown folder, diagnosis or missing file is an error."""
    if source.is_dir():
        return _from_folders(source)
    if source.suffix.lower() == ".csv":
        return Labelled(_from_csv(source), [])
    raise DataError(f"{source}: give a folder with one subfolder per diagnosis, or a CSV with path,diagnosis")


def _from_folders(root: Path) -> Labelled:
    images: list[LabelledImage] = []
    loose = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            diagnosis = parse_diagnosis(folder.name)
        except ValueError as error:
            raise DataError(f"{folder}: folder name {error}") from None
        images += [LabelledImage(path, diagnosis) for path in iter_candidates(folder)]
    if not images:
        raise DataError(f"{root}: no images in folders named after a diagnosis")
    return Labelled(images, loose)


def _from_csv(table: Path) -> list[LabelledImage]:
    images = []
    for line, row in read_table(table, "path,diagnosis", lambda header: {"path", "diagnosis"} <= header):
        path = table.parent / row["path"]  # relative paths are read from the CSV's folder
        try:
            diagnosis = parse_diagnosis(row["diagnosis"] or "")
        except ValueError as error:
            raise DataError(f"{table} line {line}: diagnosis {error}") from None
        if not path.is_file():
            raise DataError(f"{table} line {line}: no file {path}")
        images.append(LabelledImage(path, diagnosis))
    if not images:
        raise DataError(f"{table}: no rows")
    return images
