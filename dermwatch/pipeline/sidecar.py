"""The optional ``<stem>.json`` beside an image: who and where, stored with its arrival."""

from __future__ import annotations

import json
from pathlib import Path

from dermwatch.errors import RejectedImage
from dermwatch.pipeline.regular_file import open_regular

#: Keys a sidecar may hold; each value is a string. A misspelt key is an error, not a
#: silent loss of the patient reference.
SIDECAR_KEYS = ("patient_reference", "lesion_reference", "body_site", "notes")
MAX_SIDECAR_BYTES = 64 * 1024


def read_sidecar(path: Path | None, name: str) -> dict[str, str] | None:
    """Parse and check the sidecar at ``path`` (shown as ``name``); raise RejectedImage naming the fault.

    The size is checked before anything is read: a huge file is refused without loading it.
    """
    if path is None:
        return None
    try:
        with open_regular(path) as handle:
            raw = handle.read(MAX_SIDECAR_BYTES + 1)
    except RejectedImage as error:
        raise RejectedImage(f"sidecar {name}: {error}") from None
    except OSError as error:
        raise RejectedImage(f"cannot read sidecar {name}: {error.strerror}") from None
    if len(raw) > MAX_SIDECAR_BYTES:
        raise RejectedImage(f"sidecar {name} is over {MAX_SIDECAR_BYTES} bytes")
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RejectedImage(f"sidecar {name} is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise RejectedImage(f"sidecar {name} must hold a JSON object")
    unknown = sorted(set(document) - set(SIDECAR_KEYS))
    if unknown:
        raise RejectedImage(
            f"sidecar {name} has unknown key(s) {', '.join(unknown)} (allowed: {', '.join(SIDECAR_KEYS)})"
        )
    wrong = sorted(key for key, value in document.items() if not isinstance(value, str))
    if wrong:
        raise RejectedImage(f"sidecar {name}: {', '.join(wrong)} must be text")
    return document
