"""Find the images of one-folder-per-class data roots, and what each file is."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dermwatch.errors import DataError
from dermwatch.labels import CLASS_NAMES
from dermwatch.pipeline.decode import ACCEPTED_FORMATS

#: The files read as images: every name Pillow gives a format the service reads
#: (pipeline/decode.py), so that training and the service cannot drift apart. Besides
#: .jpg, .png, .bmp and .tif, that is .jfif (a browser's "save image as" on Windows) and kin.
IMAGE_SUFFIXES = frozenset(suffix for suffix, image_format in Image.registered_extensions().items()
                           if image_format in ACCEPTED_FORMATS)
_ISIC_ID = re.compile(r"ISIC_\d{7}")
_SPLIT_FOLDERS = {"train": "train", "test": "test"}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScannedFile:
    """One image file found under a data root."""

    path: Path
    root: str  # name of the --data root it came from, e.g. "isic9" or "supplement"
    origin: str  # "train" (may be used for training) or "test" (held out entirely)
    folder_label: str
    image_id: str  # ISIC id from the file name, or the file stem
    sha256: str


def scan_roots(roots: list[Path]) -> list[ScannedFile]:
    """Scan each root: either class folders directly, or Train/ and Test/ holding them."""
    found: list[ScannedFile] = []
    for root in roots:
        if not root.is_dir():
            raise DataError(f"data root {root} is not a folder")
        splits = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
        if set(splits) & set(_SPLIT_FOLDERS):
            for name, folder in sorted(splits.items()):
                if name not in _SPLIT_FOLDERS:
                    raise DataError(f"{folder}: expected only Train/ and Test/ beside each other")
                found += _scan_class_folders(folder, root.name, _SPLIT_FOLDERS[name])
        else:
            found += _scan_class_folders(root, root.name, "train")
    if not found:
        raise DataError(f"no images found under {', '.join(map(str, roots))}")
    return found


def _scan_class_folders(folder: Path, root_name: str, origin: str) -> list[ScannedFile]:
    files: list[ScannedFile] = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if class_dir.name not in CLASS_NAMES:
            raise DataError(
                f"{class_dir}: folder name is not one of the nine classes ({', '.join(CLASS_NAMES)})"
            )
        left_out = []
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                if not path.name.startswith("."):  # .DS_Store and the like are no one's images
                    left_out.append(path.name)
                continue
            match = _ISIC_ID.search(path.stem)
            files.append(
                ScannedFile(
                    path=path,
                    root=root_name,
                    origin=origin,
                    folder_label=class_dir.name,
                    image_id=match.group(0) if match else path.stem,
                    sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                )
            )
        if left_out:
            log.warning("%s: %d entr%s left out, not an image file by name (%s): %s", class_dir, len(left_out),
                        "y" if len(left_out) == 1 else "ies", ", ".join(sorted(IMAGE_SUFFIXES)),
                        ", ".join(left_out[:3]) + (", …" if len(left_out) > 3 else ""))
    return files
