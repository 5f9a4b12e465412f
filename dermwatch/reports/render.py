"""Render a day to HTML, CSV and JSON, and the index of all days; every file written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import threading
import urllib.parse
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from zoneinfo import ZoneInfo

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy import Engine

from dermwatch.config import Settings
from dermwatch.labels import CLASS_NAMES, MALIGNANT, display_name
from dermwatch.modelcard import ModelCard
from dermwatch.pipeline.classifier import Predictor
from dermwatch.pipeline.sidecar import SIDECAR_KEYS
from dermwatch.reports.atomic import write_atomically
from dermwatch.reports.budget import CpuBudget
from dermwatch.reports.day import ArrivalRow, Day, ImageRow, load_day
from dermwatch.reports.pictures import LIST_THUMBNAIL_SIDE, Pictures
from dermwatch.safe_text import shown
from dermwatch.site.drift import alert_rate, drift_warning
from dermwatch.site.outcomes import outcome_summary
from dermwatch.site.threshold import AlertThreshold, threshold_for

CSV_FIELDS = [
    "status", "received_at", "original_name", "sha256", "patient_reference", "lesion_reference", "body_site",
    "notes", "top_label", "melanoma_score", "flagged", "alerted", *CLASS_NAMES, "model_version", "archive_path",
    "reviewed_by", "reason",
]

def _shown_in_page(value: object) -> object:
    """Every plain string a template prints, escaped so that the page can always be encoded."""
    return shown(value, keep_lines=True) if type(value) is str else value


_environment = Environment(
    loader=PackageLoader("dermwatch", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
    finalize=_shown_in_page,
)
_environment.filters["display"] = display_name


def _breakable(name: str) -> Markup:
    """A file name or path that may wrap after its separators (_ - . /) and nowhere else."""
    return Markup("<wbr>").join(re.split(r"(?<=[_\-./])", shown(name)))


_environment.filters["breakable"] = _breakable


@dataclass(frozen=True)
class Rendered:
    html: Path
    csv: Path
    json: Path
    images: int
    flagged: int
    rejected: int
    drift_warning: str | None = None


def render_day(engine: Engine, day: date, *, reports_dir: Path, site_name: str, card: ModelCard | None,
               threshold: AlertThreshold | None, pictures: Pictures, zone: ZoneInfo) -> Rendered:
    """Write reports_dir/YYYY-MM-DD.{html,csv,json} for ``day`` and refresh the index."""
    loaded = load_day(engine, day, zone, threshold)
    rows = _flat_rows(loaded)
    stem = reports_dir / day.isoformat()
    rate = alert_rate(len(loaded.images), len(loaded.flagged), threshold.expected_flag_rate if threshold else None)
    warning = drift_warning(rate)
    outcomes = outcome_summary(engine)
    page = _environment.get_template("report.html").generate(
        day=loaded, site_name=site_name, card=card, threshold=threshold,
        threshold_words=threshold_words(card, threshold), alert_rate=rate, drift_warning=warning,
        outcomes=outcomes,
        class_counts=loaded.class_counts(), malignant=MALIGNANT, pictures=pictures, list_side=LIST_THUMBNAIL_SIDE,
        zone_name=str(zone), original_link=lambda archive_path: _relative_link(archive_path, reports_dir),
    )
    write_atomically(stem.with_suffix(".html"), (chunk.encode() for chunk in page))  # streamed: megabytes whole
    write_atomically(stem.with_suffix(".csv"), _csv(rows).encode())
    summary = {"images": len(loaded.images), "flagged": len(loaded.flagged), "rejected": len(loaded.rejected)}
    document = {
        "date": day.isoformat(), "site": site_name, "timezone": str(zone), **summary,
        "threshold": threshold.value if threshold else None,
        "threshold_source": threshold.source if threshold else "no model loaded",
        "alert_rate": rate, "drift_warning": warning, "outcomes": outcomes, "rows": rows,
    }
    write_atomically(stem.with_suffix(".json"), (json.dumps(document, indent=2) + "\n").encode())
    render_index(reports_dir, site_name)
    return Rendered(stem.with_suffix(".html"), stem.with_suffix(".csv"), stem.with_suffix(".json"), **summary,
                    drift_warning=warning)


def _relative_link(archive_path: str, reports_dir: Path) -> str:
    """A link to the archived original that works when the reports folder is opened as files:
    relative, and URL-encoded, so a name with '#', '%' or '?' still links to its file."""
    return urllib.parse.quote(Path(os.path.relpath(archive_path, reports_dir.resolve())).as_posix())


def render_index(reports_dir: Path, site_name: str) -> Path:
    """index.html: every day with a report, newest first, from the days' own JSON files."""
    days = []
    for path in sorted(reports_dir.glob("[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9].json"), reverse=True):
        document = json.loads(path.read_text())
        days.append({key: document[key] for key in ("date", "images", "flagged", "rejected")})
    page = _environment.get_template("index.html").render(days=days, site_name=site_name)
    index = reports_dir / "index.html"
    write_atomically(index, page.encode())
    return index


def threshold_words(card: ModelCard | None, threshold: AlertThreshold | None) -> str:
    """The report header's sentence on when an image is flagged, where that threshold comes from,
    and what it caught before."""
    if card is None or threshold is None:
        return ""
    words = f"Images with P(melanoma) ≥ {threshold.value:.3f} are flagged"
    if threshold.validated_at_site:
        return words + f" ({threshold.source})."
    rule = card.document.get("training", {}).get("threshold_rule", "")
    held_out = card.document.get("evaluation", {}).get("sets", {}).get("test_leak_free", {})
    if rule:
        words += f"; the threshold was set on validation images as the {rule}"
    if held_out.get("melanoma_images"):
        # Counts, not a percentage: "16 of 16" shows how few images stand behind the figure.
        total = held_out["melanoma_images"]
        caught = round(held_out["melanoma_sensitivity"] * total)
        words += f" (on held-out test images it caught {caught} of {total} melanomas)"
    return words + "."


#: A cell starting with one of these is a formula to a spreadsheet (OWASP, "CSV injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _flat_rows(day: Day) -> list[dict]:
    """One row per arrival (each with its own sidecar), then one per rejected file."""
    rows = [_arrival_record(row, arrival) for row in day.images for arrival in row.arrivals]
    rows += [
        {field: "" for field in CSV_FIELDS}
        | {"status": "rejected", "received_at": r.rejected_at.isoformat(timespec="seconds"),
           "original_name": r.original_name, "reason": r.reason}
        for r in day.rejected
    ]
    return rows


def _arrival_record(row: ImageRow, arrival: ArrivalRow) -> dict:
    return {
        "status": "flagged" if row.flagged else "classified",
        "received_at": arrival.received_at.isoformat(timespec="seconds"),
        "original_name": arrival.original_name,
        "sha256": row.sha256,
        **{key: arrival.sidecar.get(key, "") for key in SIDECAR_KEYS},
        "top_label": row.top_label,
        "melanoma_score": round(row.melanoma_score, 6),
        "flagged": row.flagged,
        "alerted": row.alerted,
        **{label: round(p, 6) for label, p in row.probabilities.items()},
        "model_version": row.model_version,
        "archive_path": row.archive_path,
        "reviewed_by": row.reviewed_by or "",
        "reason": "",
    }


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows({key: neutralised(value) for key, value in row.items()} for row in rows)
    return buffer.getvalue()


def neutralised(value):
    """Text as a CSV cell can carry it (shown), and text that a spreadsheet would run as a formula,
    also after leading spaces or line breaks, made plain text by a leading apostrophe."""
    if not isinstance(value, str):
        return value
    value = shown(value, keep_lines=True)
    if value.startswith(FORMULA_STARTS) or value.lstrip(" \t\r\n").startswith(FORMULA_STARTS):
        return "'" + value
    return value


class Reporter:
    """What rendering needs, opened once: database, model card, picture cache, settings."""

    def __init__(self, settings: Settings, engine: Engine, classifier: Predictor | None,
                 stopping: threading.Event | None = None, budget: CpuBudget | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.card = classifier.card if classifier is not None else None
        self.pictures = Pictures(settings.paths.state / "cache", classifier, settings.max_pixels, stopping, budget)

    def render(self, day: date) -> Rendered:
        reports = self.settings.reports
        threshold = threshold_for(self.engine, self.card) if self.card else None
        return render_day(self.engine, day, reports_dir=self.settings.paths.reports, site_name=reports.site_name,
                          card=self.card, threshold=threshold, pictures=self.pictures, zone=reports.timezone)
