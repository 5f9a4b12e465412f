"""Commands that fit dermwatch to a site and learn from it: calibrate, outcome import, review."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

import click
import numpy as np

from dermwatch.cli_options import config_option
from dermwatch.config import Settings, load_settings
from dermwatch.errors import DataError, ModelError
from dermwatch.labels import CLASS_NAMES, MELANOMA


@click.command()
@config_option
@click.argument("source", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--sensitivity", type=click.FloatRange(0.5, 1.0), default=0.90, show_default=True,
              help="Share of the site's melanomas the alert must flag.")
@click.option("--from-outcomes", is_flag=True,
              help="Calibrate on the confirmed diagnoses imported with `dermwatch outcome import` instead of SOURCE.")
def calibrate(config_path: Path | None, source: Path | None, sensitivity: float, from_outcomes: bool) -> None:
    """Fit the alert threshold to this site's own labelled images.

    SOURCE is a folder with one subfolder per diagnosis (the nine class names), or a CSV
    with columns path,diagnosis. The images are classified as the service does; the
    threshold that flags the asked share of their melanomas is stored, with its history,
    for the model in use, and the service, `process`, `classify`, reports and alerts use it.
    """
    from dermwatch.pipeline.classifier import load_classifier
    from dermwatch.site.calibration import fit_threshold, record_fit
    from dermwatch.site.threshold import threshold_for
    from dermwatch.store.db import ensure_schema, make_engine

    if bool(source) == from_outcomes:
        raise click.UsageError("give SOURCE (labelled images) or --from-outcomes, not both or neither")
    settings = load_settings(config_path)
    engine = make_engine(settings.database_url, settings.busy_timeout_seconds)
    ensure_schema(engine)
    classifier = load_classifier(settings.model.path, settings.model.threads)
    card = classifier.card
    if from_outcomes:
        scores, is_melanoma = _outcome_scores(engine, card.sha256)
        described = f"{len(scores)} confirmed outcomes"
    else:
        scores, is_melanoma = _labelled_scores(classifier, source, settings.max_pixels, settings.model.batch_size)
        described = str(source)  # printed as given; stored resolved, as the record of what it was fitted on
    before = threshold_for(engine, card)
    fit = fit_threshold(scores, is_melanoma, sensitivity)
    stored = record_fit(engine, card, fit, method="outcomes" if from_outcomes else "images",
                        source=described if from_outcomes else str(source.resolve()))
    specificity = str(fit.specificity) if fit.specificity else "n/a (no image other than melanoma)"
    click.echo(f"calibrated on {fit.images} images ({fit.melanomas} melanomas) from {described}")
    was = "the site's earlier calibration" if before.validated_at_site else "the model card's"
    click.echo(f"  threshold:   P(melanoma) >= {fit.threshold:.4f} (was {before.value:.4f}, {was})")
    click.echo(f"  sensitivity: {fit.sensitivity} (asked for {sensitivity:.2f})")
    click.echo(f"  specificity: {specificity}")
    click.echo(f"  flags {fit.flag_rate:.1%} of these images")
    click.echo(f"stored {stored.created_at:%Y-%m-%d %H:%M} UTC as the site threshold for {card.display}")
    _show_in_todays_report(settings, engine, classifier)


def _labelled_scores(classifier, source: Path, max_pixels: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    from dermwatch.pipeline.scoring import score_files
    from dermwatch.site.calibration import require_melanomas
    from dermwatch.site.labelled import read_labelled

    found = read_labelled(source)
    for path in found.unused:
        click.echo(f"not used: {path} (outside the diagnosis folders, so it has no label)", err=True)
    labelled = found.images
    require_melanomas(sum(image.diagnosis == MELANOMA for image in labelled))  # before classifying them all
    melanoma = CLASS_NAMES.index(MELANOMA)
    scores, is_melanoma, unreadable = [], [], 0
    scored = score_files(classifier, [image.path for image in labelled], max_pixels=max_pixels, batch_size=batch_size)
    for image, result in zip(labelled, scored, strict=True):
        if result.probabilities is None:
            click.echo(f"left out: {image.path}: {result.reason}", err=True)
            unreadable += 1
            continue
        scores.append(float(result.probabilities[melanoma]))
        is_melanoma.append(image.diagnosis == MELANOMA)
    if unreadable:
        click.echo(f"{unreadable} of {len(labelled)} images could not be read and were left out (listed above)",
                   err=True)
    return np.array(scores), np.array(is_melanoma, bool)


def _outcome_scores(engine, model_sha256: str) -> tuple[np.ndarray, np.ndarray]:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from dermwatch.store.models import ConfirmedDiagnosis, Prediction

    with Session(engine) as session:
        rows = session.execute(
            select(Prediction.melanoma_score, ConfirmedDiagnosis.diagnosis)
            .join(ConfirmedDiagnosis, ConfirmedDiagnosis.image_id == Prediction.image_id)
            .where(Prediction.model_sha256 == model_sha256)
        ).all()
    if not rows:
        raise DataError("no confirmed outcome has a prediction by this model: import some with "
                        "`dermwatch outcome import`, or calibrate on labelled images")
    return np.array([score for score, _ in rows]), np.array([d == MELANOMA for _, d in rows], bool)


@click.group()
def outcome() -> None:
    """Confirmed diagnoses (biopsy or clinical) of classified images."""


@outcome.command("import")
@config_option
@click.argument("table", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def outcome_import(config_path: Path | None, table: Path) -> None:
    """Record the diagnoses in TABLE, a CSV with columns file_name,diagnosis (or sha256,diagnosis).

    Importing the same file again changes nothing; rows that match no image are listed and
    make the exit status 1, after the others are recorded.
    """
    from dermwatch.site.outcomes import import_outcomes
    from dermwatch.store.db import ensure_schema, make_engine

    settings = load_settings(config_path)
    engine = make_engine(settings.database_url, settings.busy_timeout_seconds, create=False)
    ensure_schema(engine)
    result = import_outcomes(engine, table)
    for problem in result.unknown:
        click.echo(f"not recorded: {problem}", err=True)
    click.echo(f"{result.recorded} recorded, {result.changed} changed, {result.unchanged} already known, "
               f"{len(result.unknown)} not recorded")
    if result.recorded or result.changed:
        _show_in_todays_report(settings, engine)
    if result.unknown:
        sys.exit(1)


@click.command()
@config_option
@click.argument("images", nargs=-1, required=True)
@click.option("--by", "reviewer", default=getpass.getuser, show_default="your user name",
              help="Who looked at the images.")
def review(config_path: Path | None, images: tuple[str, ...], reviewer: str) -> None:
    """Mark flagged images as looked at, so the report shows which flags nobody has seen yet.

    IMAGES are sha256 values (the first 12 characters are enough) or file names as received.
    """
    from dermwatch.site.reviews import mark_reviewed
    from dermwatch.store.db import ensure_schema, make_engine

    settings = load_settings(config_path)
    engine = make_engine(settings.database_url, settings.busy_timeout_seconds, create=False)
    ensure_schema(engine)
    marked, problems = mark_reviewed(engine, images, reviewer)
    for problem in problems:
        click.echo(f"not marked: {problem}", err=True)
    click.echo(f"{marked} image(s) marked reviewed by {reviewer}")
    if marked:
        _show_in_todays_report(settings, engine)
    if problems:
        sys.exit(1)


def _show_in_todays_report(settings: Settings, engine, classifier=None) -> None:
    """Bring what was just recorded onto today's report. A running service rewrites it itself
    within a minute (it watches site_state); without one, it is written here and now."""
    from datetime import datetime

    from dermwatch.pipeline.classifier import load_classifier
    from dermwatch.reports.render import Reporter
    from dermwatch.watcher.instance import service_running

    if service_running(settings, engine):
        click.echo("the running service shows this in today's report within a minute")
        return
    if classifier is None:
        try:
            classifier = load_classifier(settings.model.path, settings.model.threads)
        except ModelError as error:
            click.echo(f"warning: no heatmaps in the refreshed report: {error}", err=True)
    today = datetime.now(settings.reports.timezone).date()
    rendered = Reporter(settings, engine, classifier).render(today)
    click.echo(f"today's report refreshed: {rendered.html}")


SITE_COMMANDS = (calibrate, outcome, review)
