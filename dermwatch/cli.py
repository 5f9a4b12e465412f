"""The `dermwatch` command: one click group; each error becomes one line and exit status 1."""

from __future__ import annotations

import csv
import json
import sys
import time
from collections import Counter
from pathlib import Path

import click

from dermwatch.cli_options import config_option
from dermwatch.config import Settings, load_settings
from dermwatch.errors import DatabaseError, DermwatchError, ModelError
from dermwatch.labels import CLASS_NAMES, MELANOMA
from dermwatch.logs import setup_logging
from dermwatch.permissions import close_to_others
from dermwatch.pipeline.claim import iter_candidates
from dermwatch.site.commands import SITE_COMMANDS

# Training commands need TensorFlow-side packages, so they are imported only when asked for.
_TRAINING_COMMANDS = {
    "audit": "audit_command", "train": "train_command", "ensemble": "ensemble_command", "export": "export_command",
    "evaluate": "evaluate_command",
}


class DermwatchGroup(click.Group):
    """A click group that turns every DermwatchError into one line and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DermwatchError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(1)

    def get_command(self, ctx: click.Context, name: str):
        if name in _TRAINING_COMMANDS:
            return _training_command(name)
        return super().get_command(ctx, name)

    def list_commands(self, ctx: click.Context):
        return sorted([*super().list_commands(ctx), *_TRAINING_COMMANDS])


def _training_command(name: str) -> click.Command:
    try:
        from dermwatch.training import commands
    except ImportError as error:
        message = f"'{name}' needs the training extras: pip install 'dermwatch[train]' ({error})"

        def missing_extras() -> None:
            raise click.ClickException(message)

        return click.Command(name, callback=missing_extras, help=message,
                             context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    return getattr(commands, _TRAINING_COMMANDS[name])


@click.group(cls=DermwatchGroup)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="config.toml for the command; the same as --config after the command.")
@click.version_option(package_name="dermwatch")
@click.pass_context
def cli(context: click.Context, verbose: bool, config_path: Path | None) -> None:
    """Classify dermoscopy images as they arrive and report suspected melanoma."""
    close_to_others()  # reports, archive and quarantine hold patient references
    setup_logging(verbose)
    if config_path is not None:  # every command that reads a config takes it as its own default
        context.default_map = {name: {"config_path": config_path} for name in context.command.list_commands(context)}


@cli.command()
@config_option
@click.option("--create-intake", is_flag=True,
              help="Create the configured intake folder if it does not exist (else that is refused as a typo).")
def run(config_path: Path | None, create_intake: bool) -> None:
    """Run the service in the foreground: watch the intake folder until SIGTERM.

    A new model file (with its card) or SIGHUP makes it start over with the new model and the
    configuration read again, without losing anything in hand.
    """
    from dermwatch.watcher.service import run_service

    run_service(load_settings(config_path), lambda: load_settings(config_path), create_intake=create_intake)


@cli.command()
@config_option
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def process(config_path: Path | None, paths: tuple[Path, ...]) -> None:
    """Process image files or folders once, as the service would, then exit.

    Files are moved into the archive (or quarantine), exactly as from the intake folder.
    """
    from dermwatch.pipeline.process import check_settings, open_processor

    settings = load_settings(config_path)
    check_settings(settings)
    processor = open_processor(settings)
    try:
        outcomes, files = _process_files(settings, processor, _collect(paths))
    finally:
        processor.tidy()
        if processor.membership is not None:  # PostgreSQL: signed off, so nobody waits out its lease
            processor.membership.leave()
        processor.lanes.close()
    if settings.alerts.channels:
        from dermwatch.alerts import send_pending

        send_pending(processor.engine, settings.alerts, settings.reports.site_name, settings.reports.timezone)
    for outcome in outcomes:
        if outcome.status == "rejected":
            click.echo(f"rejected: {outcome.name}: {outcome.detail}", err=True)
    by_status = Counter(outcome.status for outcome in outcomes)
    vanished = len(files) - len(outcomes)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(by_status.items())) or "no image files found"
    not_taken = f", {vanished} not taken (vanished, or could not be moved: see the log)" if vanished else ""
    click.echo(f"{summary}{not_taken}")


def _process_files(settings: Settings, processor, files: list[Path]) -> tuple[list, list[Path]]:
    """Claim and process ``files`` batch by batch, with a progress bar; a passing fault stops it."""
    from dermwatch.errors import TransientFault, as_transient

    outcomes = []
    with click.progressbar(length=len(files), label="classifying", file=sys.stderr) as bar:
        for start in range(0, len(files), settings.model.batch_size):
            batch = files[start : start + settings.model.batch_size]
            try:
                if processor.membership is not None:
                    processor.membership.beat(may_lead=False)  # alive, so no worker takes this batch over
                claimed = [c for c in map(processor.claim, batch) if c is not None]
                outcomes += processor.process(claimed)
            except Exception as error:
                fault = as_transient(error)
                if fault is None:
                    raise
                raise TransientFault(f"{fault}; stopped after {len(outcomes)} file(s). Files already taken "
                                     f"wait in {processor.work_dir} and are finished when the service next "
                                     "starts; run this again for the rest") from error
            bar.update(len(batch))
    return outcomes, files


@cli.command()
@config_option
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--format", "output_format", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
def classify(config_path: Path | None, paths: tuple[Path, ...], output_format: str) -> None:
    """Classify images and print the result; stores and moves nothing.

    `flagged` uses the alert threshold in force: the site's calibration once there is one.
    """
    from dermwatch.pipeline.classifier import load_classifier
    from dermwatch.pipeline.scoring import score_files

    settings = load_settings(config_path)
    classifier = load_classifier(settings.model.path, settings.model.threads)
    threshold = _threshold_in_force(settings, classifier.card)
    click.echo(f"alert threshold {threshold.value:.4f}: {threshold.source}", err=True)
    results, failures = [], 0
    for scored in score_files(classifier, _collect(paths), max_pixels=settings.max_pixels,
                              batch_size=settings.model.batch_size):
        if scored.probabilities is None:
            click.echo(f"error: {scored.path}: {scored.reason}", err=True)
            failures += 1
        else:
            results.append((scored.path, scored.probabilities))
    _print_classifications(results, threshold.value, output_format)
    if failures:
        sys.exit(1)


def _threshold_in_force(settings: Settings, card):
    """The site's threshold from the database; the card's when nothing has run here yet."""
    from dermwatch.site.threshold import threshold_for, unvalidated
    from dermwatch.store.db import ensure_schema, make_engine

    try:
        engine = make_engine(settings.database_url, settings.busy_timeout_seconds, create=False)
    except DatabaseError:
        return unvalidated(card)
    ensure_schema(engine)
    return threshold_for(engine, card)


def _print_classifications(results, threshold: float, output_format: str) -> None:
    melanoma = CLASS_NAMES.index(MELANOMA)
    rows = [
        {
            "path": str(path),
            **{label: round(float(p), 6) for label, p in zip(CLASS_NAMES, probabilities, strict=True)},
            "label": CLASS_NAMES[int(probabilities.argmax())],
            "flagged": bool(probabilities[melanoma] >= threshold),
        }
        for path, probabilities in results
    ]
    if output_format == "json":
        click.echo(json.dumps(rows, indent=2))
    elif output_format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=["path", *CLASS_NAMES, "label", "flagged"])
        writer.writeheader()
        writer.writerows(rows)
    else:
        for row in rows:
            flag = "  FLAGGED: possible melanoma" if row["flagged"] else ""
            click.echo(f"{row['path']}: {row['label']} ({row[row['label']]:.2f}), "
                       f"P(melanoma) {row[MELANOMA]:.3f}{flag}")


@cli.command()
@config_option
@click.option("--date", "day", type=click.DateTime(["%Y-%m-%d"]),
              help="The day to render, in the configured time zone (default: today).")
@click.option("--open", "open_after", is_flag=True, help="Open the report in the default browser.")
def report(config_path: Path | None, day, open_after: bool) -> None:
    """Write the day's report (HTML, CSV, JSON) and the index of all days."""
    from datetime import datetime

    from dermwatch.pipeline.classifier import load_classifier
    from dermwatch.reports.render import Reporter
    from dermwatch.store.db import ensure_schema, make_engine

    settings = load_settings(config_path)
    engine = make_engine(settings.database_url, create=False)
    ensure_schema(engine)
    try:
        classifier = load_classifier(settings.model.path, settings.model.threads)
    except ModelError as error:
        click.echo(f"warning: no heatmaps in this report: {error}", err=True)
        classifier = None
    chosen = day.date() if day else datetime.now(settings.reports.timezone).date()
    rendered = Reporter(settings, engine, classifier).render(chosen)
    click.echo(f"{rendered.html}: {rendered.images} images, {rendered.flagged} suspected melanoma, "
               f"{rendered.rejected} could not be read")
    if open_after:
        click.launch(str(rendered.html))


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def status(config_path: Path | None, as_json: bool) -> None:
    """Whether the service runs and what it is waiting out; counts, alerts, threshold, model, schema.

    Exits 1 when the model or the database cannot be used as they are.
    """
    from dermwatch.modelcard import load_card, shipped_model_path
    from dermwatch.store.db import current_revision, head_revision, make_engine
    from dermwatch.store.queries import alert_counts, counts

    settings = load_settings(config_path)
    engine = make_engine(settings.database_url, create=False)
    revision = current_revision(engine)
    current = revision == head_revision()
    report: dict = {"config": str(settings.source) if settings.source else None}
    report |= _service_state(settings, engine, current)
    report |= counts(engine) if revision else dict.fromkeys(
        ("images", "sightings", "predictions", "flagged", "quarantined"), 0)
    report["pending"] = _pending(settings)
    report |= alert_counts(engine) if current else dict.fromkeys(("alerts_queued", "alerts_failing", "alert_error"))
    report["last_report"] = _last_report(settings)
    try:
        card = load_card(settings.model.path or shipped_model_path())
        report["model"] = card.display
    except ModelError as error:
        card, report["model"], report["model_error"] = None, None, str(error)
    unknown = "unknown: " + ("no usable model" if card is None else "database schema not current")
    report |= _alert_state(settings, engine, card) if card and current else {"threshold": None,
                                                                             "threshold_source": unknown}
    report["db_revision"], report["db_head"] = revision, head_revision()
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            click.echo(f"{key.replace('_', ' '):>18}: {_for_people(value)}")
    if card is None or (revision is not None and not current):
        sys.exit(1)


def _for_people(value: object, indent: int = 20) -> str:
    """A status value as words: no Python reprs; a list of records one per line."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')} {_for_people(v)}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        if not value:
            return "none"
        return ("\n" + " " * indent).join(_for_people(item) for item in value)
    return str(value)


def _alert_state(settings: Settings, engine, card) -> dict:
    """The threshold in force, and today's flag rate against what its calibration implies."""
    from datetime import datetime

    from dermwatch.reports.day import load_day
    from dermwatch.site.drift import alert_rate, drift_warning
    from dermwatch.site.threshold import threshold_for

    threshold = threshold_for(engine, card)
    today = load_day(engine, datetime.now(settings.reports.timezone).date(), settings.reports.timezone, threshold)
    rate = alert_rate(len(today.images), len(today.flagged), threshold.expected_flag_rate)
    return {"threshold": threshold.value, "threshold_source": threshold.source, "alert_rate_today": rate,
            "drift_warning": drift_warning(rate)}


def _last_report(settings: Settings) -> str | None:
    """When a day's report was last written (local time), from the files themselves."""
    from datetime import datetime

    written = [p.stat().st_mtime for p in settings.paths.reports.glob("[0-9][0-9][0-9][0-9]-*.html")] \
        if settings.paths.reports.is_dir() else []
    if not written:
        return None
    return datetime.fromtimestamp(max(written), settings.reports.timezone).isoformat(timespec="seconds")


def _service_state(settings: Settings, engine, current: bool) -> dict:
    """Running or not; while running, the passing faults it is waiting out (its status file).

    On PostgreSQL, every worker sharing the database, with its heartbeat and whether it leads.
    """
    from dermwatch.pipeline.workers import cooperative, worker_rows
    from dermwatch.watcher.health import STATUS_FILE, worker_status_file
    from dermwatch.watcher.instance import holder

    if not cooperative(settings.database_url):
        pid = holder(settings)
        if pid is None:
            return {"service": "not running", "faults": {}}
        published = _published(settings.paths.state / STATUS_FILE)
        return {"service": f"running (PID {pid})", "service_status": published.get("status"),
                "service_model": published.get("model"), "faults": published.get("faults", {})}
    workers = worker_rows(engine, settings.worker_lease_seconds) if current else []
    alive = [w for w in workers if w["state"] == "alive"]
    faults = {}
    for worker in alive:
        published = _published(settings.paths.state / worker_status_file(worker["id"]))
        worker["model"] = published.get("model")
        faults |= {f"{worker['id']}: {part}": fault for part, fault in published.get("faults", {}).items()}
    return {"service": f"{len(alive)} worker(s) running" if alive else "not running", "workers": workers,
            "faults": faults}


def _published(path: Path) -> dict:
    for _ in range(3):  # rewritten in place by the service: a read may catch it mid-write
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
    return {}


def _pending(settings: Settings) -> int:
    """Files waiting in the intake folder, plus arrivals not yet finished in state/work/
    (each worker's own folder in it included)."""
    from dermwatch.pipeline.workers import WORKER_PREFIX

    waiting = sum(1 for _ in iter_candidates(settings.paths.intake))
    if settings.paths.work.is_dir():
        for entry in settings.paths.work.iterdir():
            if entry.name.startswith(WORKER_PREFIX):
                try:
                    waiting += sum(1 for _ in entry.iterdir())
                except FileNotFoundError:  # the worker finished its claims and removed its folder
                    pass
            elif not entry.name.endswith(".json"):
                waiting += 1
    return waiting


@cli.group()
def db() -> None:
    """Database schema: upgrade it, or check it is current."""


@db.command("upgrade")
@config_option
def db_upgrade(config_path: Path | None) -> None:
    """Migrate the database to the schema this version needs."""
    from dermwatch.store.db import current_revision, head_revision, make_engine, upgrade

    engine = make_engine(load_settings(config_path).database_url)
    before = current_revision(engine)
    upgrade(engine)
    click.echo(f"database at revision {head_revision()} (was {before or 'empty'})")


@db.command("check")
@config_option
def db_check(config_path: Path | None) -> None:
    """Exit 0 if the schema is current, 1 (with the fix) if not."""
    from dermwatch.store.db import current_revision, head_revision, make_engine

    engine = make_engine(load_settings(config_path).database_url, create=False)
    current, head = current_revision(engine), head_revision()
    if current != head:
        click.echo(f"error: database at revision {current or 'none'}, needs {head}: run `dermwatch db upgrade`",
                   err=True)
        sys.exit(1)
    click.echo(f"database schema is current ({head})")


def _collect(paths: tuple[Path, ...]) -> list[Path]:
    """Files named, and the candidate files under folders named, in a stable order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            files += iter_candidates(path)
        else:
            files.append(path)
    return files


for _command in SITE_COMMANDS:
    cli.add_command(_command)


def main() -> None:
    cli()
