"""A sidecar that comes after its image: attached to that arrival, or quarantined.

Staff software sometimes writes the JSON a moment after the photo. Within the grace
period it is attached to the arrival of the same name that has none yet; after it, or
with no such arrival, it goes to quarantine with the reason. It never stays in intake.
"""

from __future__ import annotations

import glob
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import select

from dermwatch.errors import RejectedImage
from dermwatch.pipeline.claim import PLACED_NAME_MAX, is_sidecar, is_taken, new_token, place
from dermwatch.pipeline.names import display_name, fitted_name
from dermwatch.pipeline.process import Processor, rejection
from dermwatch.pipeline.sidecar import read_sidecar
from dermwatch.store.db import session_scope
from dermwatch.store.models import Image, Sighting, utc_now

log = logging.getLogger(__name__)


def settle_sidecar(processor: Processor, path: Path, grace_seconds: float) -> bool:
    """Deal with a sidecar found alone in intake; False: not yet, ask again later."""
    if _image_beside(path):
        return True  # it is taken together with its image
    try:
        written = datetime.fromtimestamp(path.lstat().st_mtime, timezone.utc)
    except FileNotFoundError:
        return True
    grace = timedelta(seconds=grace_seconds)
    stem = display_name(path.stem)
    with session_scope(processor.sessions) as session:
        candidates = session.scalars(
            select(Sighting).where(Sighting.received_at >= written - grace).order_by(Sighting.received_at.desc())
        ).all()
        # No sidecar yet: SQL NULL or JSON null, so this is asked in Python.
        sighting = next((s for s in candidates if not s.sidecar and Path(s.original_name).stem == stem), None)
        if sighting is None:
            if utc_now() - written < grace:
                return False
            reason = (f"sidecar with no image: no image named {stem}.* arrived within "
                      f"{grace_seconds:g} s before or after it")
            _reject(processor, path, reason)
            return True
        try:
            sighting.sidecar = read_sidecar(path, display_name(path.name))
        except RejectedImage as error:
            session.rollback()
            _reject(processor, path, f"{error} (its image {sighting.original_name} was classified without it)")
            return True
        image = session.get(Image, sighting.image_id)
        target = processor.archive_target(sighting.original_name, image.sha256, sighting.received_at)
    # Committed first: were the move to fail, the next look finds no arrival without a
    # sidecar and quarantines this copy; the reference is already stored either way.
    place(path, target.parent, f"{target.stem}.json", processor.umask)
    log.info("%s: attached to %s, which arrived before it", display_name(path.name), sighting.original_name)
    return True


def _reject(processor: Processor, path: Path, reason: str) -> None:
    token = new_token()
    name = fitted_name(f"{token}-", path.name, PLACED_NAME_MAX)
    with session_scope(processor.sessions) as session:
        session.add(rejection(token, path.name, reason, processor.paths.quarantine / name, size=path.lstat().st_size))
    place(path, processor.paths.quarantine, name, processor.umask)
    log.warning("%s: rejected: %s", display_name(path.name), reason)


def _image_beside(path: Path) -> bool:
    """Whether an image of the same stem waits in the same folder."""
    return any(not is_sidecar(p.name) and is_taken(p.name)
               for p in path.parent.glob(f"{glob.escape(path.stem)}.*") if p.stem == path.stem)
