"""Taking a file out of the intake folder: atomically, once, with its sidecar.

A claimed file lives in ``state/work/<token>/<original name>``, its sidecar beside it as
``.sidecar.json``. The folder keeps the name exactly as it came (no prefix makes a long
name too long), and the token is unique per arrival and stored with the result, so a
restart can tell a finished arrival from a new one and nothing is counted twice.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dermwatch.errors import DISK_FULL_ERRNOS, TransientFault
from dermwatch.pipeline.names import NAME_MAX, fitted_name
from dermwatch.pipeline.regular_file import open_regular

SIDECAR_SUFFIX = ".json"
#: Inside a claim folder; a name starting with "." is never an image to take.
CLAIMED_SIDECAR = ".sidecar.json"
PARTIAL = ".partial"
#: Separator of the flat ``<token>__<name>`` work files of versions before claim folders.
LEGACY_SEPARATOR = "__"
_IGNORED_PREFIXES = (".", "~")
_IGNORED_SUFFIXES = (".part", ".tmp")
#: Longest name place() is given: room is left for the "-N" it adds when a name is taken.
PLACED_NAME_MAX = NAME_MAX - 8


@dataclass(frozen=True)
class Claimed:
    token: str
    work_path: Path
    original_name: str  # as it came; may carry non-UTF-8 bytes as surrogates
    sidecar_path: Path | None


class Unmovable(Exception):
    """The file cannot be taken out of the intake folder (permissions, a read-only share)."""


def is_taken(name: str) -> bool:
    """Whether the watcher takes a file of this name: an image, or a sidecar."""
    lowered = name.lower()
    return not name.startswith(_IGNORED_PREFIXES) and not lowered.endswith(_IGNORED_SUFFIXES)


def is_sidecar(name: str) -> bool:
    return name.lower().endswith(SIDECAR_SUFFIX)


def iter_candidates(folder: Path, *, sidecars: bool = False,
                    on_error: Callable[[OSError], None] | None = None) -> Iterator[Path]:
    """Every image file under ``folder`` (and sidecar, if asked), in a stable order.

    Symlinked folders are not followed but yielded like files, so they are refused with a
    reason instead of being skipped in silence. A subfolder that cannot be listed is
    passed to ``on_error``.
    """
    for parent, dirs, files in os.walk(folder, onerror=on_error):
        dirs.sort()
        links = [name for name in dirs if os.path.islink(os.path.join(parent, name))]
        for name in sorted([*files, *links]):
            if is_taken(name) and (sidecars or not is_sidecar(name)):
                yield Path(parent) / name


def sidecar_of(path: Path) -> Path:
    return path.with_name(path.stem + SIDECAR_SUFFIX)


def new_token() -> str:
    return f"{time.time_ns():016x}{secrets.token_hex(4)}"


def claim(path: Path, work_dir: Path, folders: ClaimFolders) -> Claimed | None:
    """Move ``path`` (and ``<stem>.json`` beside it) into a new claim folder; None if it vanished.

    Raises :class:`Unmovable` when the file cannot be moved, :class:`TransientFault` when
    the disk is full.
    """
    token = new_token()
    folder = folders.make(work_dir, token)
    work_path = folder / path.name
    try:
        moved = _move(path, work_path)
    except OSError as error:
        shutil.rmtree(folder, ignore_errors=True)
        if error.errno in DISK_FULL_ERRNOS:
            raise TransientFault(f"disk full: cannot move files into {work_dir} ({error.strerror})") from None
        raise Unmovable(error.strerror or str(error)) from None
    if not moved:
        folders.keep(folder)
        return None
    sidecar = sidecar_of(path)
    work_sidecar = folder / CLAIMED_SIDECAR
    try:
        has_sidecar = not sidecar.is_symlink() and _move(sidecar, work_sidecar)
    except OSError:  # left in intake: it is then handled as a sidecar that came late
        has_sidecar = False
    return Claimed(token, work_path, path.name, work_sidecar if has_sidecar else None)


class ClaimFolders:
    """Makes the folder each claim lives in, by renaming one that an earlier claim emptied.

    On this ext4 disk (with training on the cores) a mkdir and an rmdir took 130-290 us
    together, a directory rename 15-20 us; claiming and archiving 384 files went from 230-340
    to 100-130 us a file.
    So a released folder is kept, empty, as a spare, and the next claim renames it to its own
    token (never reused: the token is what a restart looks up). Spares hold nothing, so a
    crash loses nothing: reclaim() removes empty folders. drop_spares() removes them once the
    intake is idle, so that state/work/ is empty between bursts.
    """

    def __init__(self) -> None:
        self._spares: list[Path] = []

    def make(self, work_dir: Path, token: str) -> Path:
        """A new, empty folder ``work_dir/token``."""
        folder = work_dir / token
        while self._spares:
            try:
                os.rename(self._spares.pop(), folder)
                return folder
            except OSError:
                continue  # removed meanwhile (reclaim() after a take-over), or work_dir is new: make one
        _guard_disk(lambda: folder.mkdir(parents=True))  # a worker's own folder comes and goes (workers.py)
        return folder

    def release(self, item: Claimed) -> None:
        """The claim's files have been placed elsewhere: keep its folder as a spare, if empty."""
        folder = item.work_path.parent
        if folder.name != item.token:
            return  # a flat work file of a version before claim folders
        try:
            empty = not os.listdir(folder)
        except FileNotFoundError:
            return
        if empty:
            self.keep(folder)
        else:  # something stray (not this claim's): never let it ride into the next one
            shutil.rmtree(folder, ignore_errors=True)

    def keep(self, folder: Path) -> None:
        self._spares.append(folder)

    def drop_spares(self) -> None:
        """Remove the spare folders (the intake is idle, or the service stops)."""
        while self._spares:
            try:
                self._spares.pop().rmdir()
            except OSError:
                pass  # gone already, or someone put a file in it: reclaim() sees to it


def reclaim(work_dir: Path) -> list[Claimed]:
    """Arrivals left in ``work_dir`` by an interrupted run, oldest first.

    Half-finished cross-filesystem copies are deleted: their source is still in intake.
    """
    claimed = []
    for entry in sorted(work_dir.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            (entry / PARTIAL).unlink(missing_ok=True)
            images = [p for p in entry.iterdir() if p.name != CLAIMED_SIDECAR]
            if not images:
                shutil.rmtree(entry)
                continue
            sidecar = entry / CLAIMED_SIDECAR
            claimed.append(Claimed(entry.name, images[0], images[0].name, sidecar if sidecar.exists() else None))
        else:
            claimed += _legacy_claim(entry)
    return claimed


def _legacy_claim(path: Path) -> list[Claimed]:
    """A flat ``<token>__<name>`` work file of an older version (sidecars ride with their image)."""
    token, separator, name = path.name.partition(LEGACY_SEPARATOR)
    if path.name.endswith(PARTIAL):
        path.unlink()
        return []
    if not separator or is_sidecar(name):
        return []
    sidecar = path.with_name(f"{token}{LEGACY_SEPARATOR}{Path(name).stem}{SIDECAR_SUFFIX}")
    return [Claimed(token, path, name, sidecar if sidecar.exists() else None)]


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
    partial = target.with_name(PARTIAL)
    try:
        shutil.copy2(source, partial, follow_symlinks=False)
        with partial.open("rb") as handle:
            os.fsync(handle.fileno())
    except FileNotFoundError:
        partial.unlink(missing_ok=True)
        return False
    except OSError:
        partial.unlink(missing_ok=True)
        raise
    os.rename(partial, target)
    source.unlink(missing_ok=True)
    return True


def place(source: Path, target_dir: Path, name: str, umask: int) -> Path:
    """Move a finished file into ``target_dir`` as ``name``, never overwriting another.

    The file keeps no permission the service's umask would not give a new file: an image
    dropped world-readable does not stay world-readable in the archive. A file the service
    does not own (staff dropped it as themselves) cannot be chmod-ed: it is copied into a
    file the service owns instead. A link is moved as a link and never chmod-ed, since that
    would change what it points to.
    """
    _guard_disk(lambda: target_dir.mkdir(parents=True, exist_ok=True))
    final = target_dir / name
    counter = 1
    while os.path.lexists(final):
        stem, dot, suffix = name.rpartition(".")
        final = target_dir / (f"{stem}-{counter}.{suffix}" if dot else f"{name}-{counter}")
        counter += 1
    try:
        os.rename(source, final)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        shutil.copy2(source, final, follow_symlinks=False)  # a sidecar straight from an intake share
        source.unlink()
    status = final.lstat()
    mode = status.st_mode & 0o7777
    if stat.S_ISREG(status.st_mode) and mode & umask:
        try:
            os.chmod(final, mode & ~umask)
        except PermissionError:
            _own_copy(final, mode & ~umask)
    return final


def _own_copy(path: Path, mode: int) -> None:
    """Replace ``path`` by a copy the service owns with ``mode`` (fsynced before the swap)."""
    partial = path.with_name(f".{path.name}{PARTIAL}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(descriptor, "wb") as copy, open_regular(path) as original:
            shutil.copyfileobj(original, copy)
            copy.flush()
            os.fchmod(copy.fileno(), mode)  # the umask may have taken more than asked
            os.fsync(copy.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def archive_name(sha256: str, original_name: str) -> str:
    """``<sha-prefix>-<name>``, shortened where that would be too long a file name."""
    return fitted_name(f"{sha256[:12]}-", original_name, PLACED_NAME_MAX)


def _guard_disk(action) -> None:
    try:
        action()
    except OSError as error:
        if error.errno in DISK_FULL_ERRNOS:
            raise TransientFault(f"disk full: {error.strerror}") from None
        raise
