"""Taking a file out of the intake folder: atomically, once, with its sidecar.

A claimed file lives in ``state/work/<token>__<original name>``. The token is unique per
arrival and is stored with the result, so a restart can tell a finished arrival from a
new one and nothing is counted twice.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SEPARATOR = "__"
SIDECAR_SUFFIX = ".json"
PARTIAL_SUFFIX = ".partial"
_IGNORED_PREFIXES = (".", "~")
_IGNORED_SUFFIXES = (".part", ".tmp", SIDECAR_SUFFIX)


@dataclass(frozen=True)
class Claimed:
    token: str
    work_path: Path
    original_name: str
    sidecar_path: Path | None


def is_candidate(name: str) -> bool:
    """Whether a file name in the intake folder is an image to take (sidecars come along)."""
    lowered = name.lower()
    return not name.startswith(_IGNORED_PREFIXES) and not lowered.endswith(_IGNORED_SUFFIXES)


def iter_candidates(folder: Path) -> Iterator[Path]:
    """Every file under ``folder`` to take, in a stable order; missing folder: none.

    Symlinked folders are not followed but yielded like files, so they are refused with a
    reason instead of being skipped in silence.
    """
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        links = [name for name in dirs if os.path.islink(os.path.join(parent, name))]
        for name in sorted([*files, *links]):
            if is_candidate(name):
                yield Path(parent) / name


def sidecar_of(path: Path) -> Path:
    return path.with_name(path.stem + SIDECAR_SUFFIX)


def claim(path: Path, work_dir: Path) -> Claimed | None:
    """Move ``path`` (and ``<stem>.json`` beside it) into ``work_dir``; None if it vanished."""
    token = f"{time.time_ns():016x}{secrets.token_hex(4)}"
    work_path = work_dir / f"{token}{SEPARATOR}{path.name}"
    if not _move(path, work_path):
        return None
    sidecar = sidecar_of(path)
    work_sidecar = work_dir / f"{token}{SEPARATOR}{sidecar.name}"
    has_sidecar = not sidecar.is_symlink() and _move(sidecar, work_sidecar)
    return Claimed(token, work_path, path.name, work_sidecar if has_sidecar else None)


def reclaim(work_dir: Path) -> list[Claimed]:
    """Arrivals left in ``work_dir`` by an interrupted run, oldest first.

    Half-finished cross-filesystem copies are deleted: their source is still in intake.
    """
    entries = sorted(work_dir.iterdir())
    names = {p.name for p in entries}
    claimed = []
    for path in entries:
        token, separator, name = path.name.partition(SEPARATOR)
        if path.name.endswith(PARTIAL_SUFFIX):
            path.unlink()
        elif separator and not name.lower().endswith(SIDECAR_SUFFIX):
            sidecar = f"{token}{SEPARATOR}{Path(name).stem}{SIDECAR_SUFFIX}"
            claimed.append(Claimed(token, path, name, work_dir / sidecar if sidecar in names else None))
    return claimed


def _move(source: Path, target: Path) -> bool:
    """Rename within one filesystem; copy then delete across filesystems (network shares)."""
    try:
        os.rename(source, target)
        return True
    except FileNotFoundError:
        return False
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    try:
        shutil.copy2(source, partial, follow_symlinks=False)
    except FileNotFoundError:
        return False
    with partial.open("rb") as handle:
        os.fsync(handle.fileno())
    os.rename(partial, target)
    source.unlink(missing_ok=True)
    return True


def place(source: Path, target: Path) -> Path:
    """Move a finished file to ``target`` (archive or quarantine), never overwriting another."""
    target.parent.mkdir(parents=True, exist_ok=True)
    final = target
    counter = 1
    while final.exists() or final.is_symlink():
        final = target.with_name(f"{target.stem}-{counter}{target.suffix}")
        counter += 1
    os.rename(source, final)
    return final
