"""Fitting dermwatch to a site: calibration, confirmed outcomes, reviews and the drift warning."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import wait_until, write_jpeg
from sqlalchemy import select
from sqlalchemy.orm import Session

from dermwatch.cli import cli
from dermwatch.config import load_settings
from dermwatch.errors import DataError
from dermwatch.site.calibration import MIN_MELANOMAS, fit_threshold, melanomas_to_flag
from dermwatch.site.drift import alert_rate, binomial_upper_tail, drift_warning
from dermwatch.store.db import make_engine
from dermwatch.store.models import Prediction, SiteThreshold


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def labelled_folder(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """root/<diagnosis>/<n>.jpg, every image different."""
    for diagnosis, count in counts.items():
        for i in range(count):
            seed += 1
            write_jpeg(root / diagnosis / f"{diagnosis[:3]}-{i:02d}.jpg", seed=seed, size=(80, 60))
    return root


def test_the_threshold_flags_the_asked_share_of_new_melanomas_not_just_these() -> None:
    melanoma_scores = np.linspace(0.95, 0.0, 20)  # 0.95, 0.90, ... 0.0
    other_scores = np.array([0.9, 0.3, 0.01, 0.02])
    scores = np.concatenate([melanoma_scores, other_scores])
    is_melanoma = np.arange(24) < 20
    fit = fit_threshold(scores, is_melanoma, 0.9)
    # 18 of 20 would be exactly 90 % of these; 19 is the fewest that new photos reach 90 % with
    # at least as often as not (P(Binomial(20, 0.9) >= 19) = 0.39).
    assert melanomas_to_flag(20, 0.9) == 19 and fit.threshold == melanoma_scores[18]
    assert fit.sensitivity.value == 0.95 and fit.sensitivity.low <= 0.95 <= fit.sensitivity.high
    assert fit.specificity.value == 0.5  # 0.9 and 0.3 flagged, 0.01 and 0.02 not
    assert fit.flag_rate == pytest.approx(21 / 24)
    assert fit_threshold(melanoma_scores, is_melanoma[:20], 0.9).specificity is None
    assert [melanomas_to_flag(m, 0.9) for m in (10, 54, 100)] == [10, 50, 91]


def test_too_few_melanomas_is_refused() -> None:
    with pytest.raises(DataError, match=f"only {MIN_MELANOMAS - 1} melanoma image"):
        fit_threshold(np.linspace(0, 1, 30), np.arange(30) < MIN_MELANOMAS - 1, 0.9)


def test_calibrate_refuses_in_one_line_with_too_few_melanomas(config_file: Path, tmp_path: Path) -> None:
    source = labelled_folder(tmp_path / "site", {"melanoma": 4, "nevus": 6})
    result = invoke("calibrate", str(source), "--config", str(config_file))
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == ("error: only 4 melanoma image(s) to calibrate on; at least 10 are needed "
                                     "for a sensitivity that means anything")


def test_calibrate_rejects_a_folder_that_is_not_a_diagnosis(config_file: Path, tmp_path: Path) -> None:
    source = labelled_folder(tmp_path / "site", {"melanoma": 2, "moles": 2})
    result = invoke("calibrate", str(source), "--config", str(config_file))
    assert result.exit_code == 1 and "folder name 'moles' is not one of the nine diagnoses" in result.stderr


def test_after_calibration_every_part_uses_the_site_threshold(any_database_config: Path, tmp_path: Path) -> None:
    config_file, settings = any_database_config, load_settings(any_database_config)
    source = labelled_folder(tmp_path / "site", {"melanoma": 12, "nevus": 15, "basal_cell_carcinoma": 3})
    (source / "labels.csv").write_text("image_id,label\n")  # as data sets often carry beside their folders
    result = invoke("calibrate", str(source), "--sensitivity", "0.9", "--config", str(config_file))
    assert result.exit_code == 0, result.output
    assert f"not used: {source / 'labels.csv'} (outside the diagnosis folders" in result.stderr
    assert "calibrated on 30 images (12 melanomas)" in result.stdout and "95% CI" in result.stdout

    status = json.loads(invoke("status", "--config", str(config_file), "--json").stdout)
    assert status["threshold_source"].startswith("site calibration of ")
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        (site,) = session.scalars(select(SiteThreshold)).all()
    assert status["threshold"] == site.threshold and site.melanomas == 12 and site.sensitivity >= 0.9

    # classify's flagged column follows the site threshold, and on the calibration images
    # it finds the asked share of melanomas.
    table = invoke("classify", "--config", str(config_file), "--format", "csv", str(source))
    rows = list(csv.DictReader(io.StringIO(table.stdout)))
    clear = [row for row in rows if abs(float(row["melanoma"]) - site.threshold) > 1e-5]  # the CSV rounds to 6 places
    assert all((row["flagged"] == "True") == (float(row["melanoma"]) > site.threshold) for row in clear)
    melanomas = [row for row in rows if "/melanoma/" in row["path"]]
    assert sum(row["flagged"] == "True" for row in melanomas) >= 0.9 * len(melanomas)

    # A second calibration is history: the newest one is in force.
    assert invoke("calibrate", str(source), "--sensitivity", "1.0", "--config", str(config_file)).exit_code == 0
    status = json.loads(invoke("status", "--config", str(config_file), "--json").stdout)
    with Session(engine) as session:
        history = session.scalars(select(SiteThreshold).order_by(SiteThreshold.id)).all()
    assert len(history) == 2 and status["threshold"] == history[-1].threshold <= site.threshold

    # process (the service's own pipeline) stores and flags with it.
    assert invoke("process", "--config", str(config_file), str(source / "melanoma")).exit_code == 0
    with Session(engine) as session:
        predictions = session.scalars(select(Prediction)).all()
    assert len(predictions) == 12
    assert all(p.threshold == history[-1].threshold and p.flagged for p in predictions)

    # Confirmed outcomes can stand in for a labelled folder.
    outcomes = tmp_path / "outcomes.csv"
    outcomes.write_text("file_name,diagnosis\n" + "".join(f"mel-{i:02d}.jpg,melanoma\n" for i in range(12)))
    assert invoke("outcome", "import", str(outcomes), "--config", str(config_file)).exit_code == 0
    refit = invoke("calibrate", "--from-outcomes", "--config", str(config_file))
    assert refit.exit_code == 0, refit.output
    assert "calibrated on 12 images (12 melanomas) from 12 confirmed outcomes" in refit.stdout
    assert "specificity: n/a" in refit.stdout
    with Session(engine) as session:
        newest = session.scalars(select(SiteThreshold).order_by(SiteThreshold.id.desc())).first()
    assert newest.method == "outcomes" and newest.melanomas == 12

    report = invoke("report", "--config", str(config_file))
    assert report.exit_code == 0, report.output
    (day_json,) = settings.paths.reports.glob("*.json")
    document = json.loads(day_json.read_text())
    assert document["threshold_source"].startswith("site") and document["threshold"] == newest.threshold
    assert document["alert_rate"] == {"images": 12, "flagged": 12, "rate": 1.0, "expected": newest.flag_rate}


def test_outcomes_are_matched_by_name_or_sha256_listed_when_unknown_and_imported_once(
        any_database_config: Path, tmp_path: Path) -> None:
    config_file, settings = any_database_config, load_settings(any_database_config)
    folder = tmp_path / "clinic"
    names = [write_jpeg(folder / f"lesion-{i}.jpg", seed=200 + i).name for i in range(6)]
    assert invoke("process", "--config", str(config_file), str(folder)).exit_code == 0
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        by_name = {p.image.original_name: p for p in session.scalars(select(Prediction))}
    table = tmp_path / "outcomes.csv"
    table.write_text(
        "file_name,sha256,diagnosis\n"
        + "".join(f"{name},,{'melanoma' if i < 3 else 'nevus'}\n" for i, name in enumerate(names[:5]))
        + f",{by_name[names[5]].image.sha256},Basal_Cell_Carcinoma\n"
        + "never-seen.jpg,,nevus\n" + f"{names[0]},,mole\n"
    )
    first = invoke("outcome", "import", str(table), "--config", str(config_file))
    assert first.exit_code == 1  # two rows could not be recorded: the user must look
    assert "6 recorded, 0 changed, 0 already known, 2 not recorded" in first.stdout
    assert "not recorded: line 8: no image was received as 'never-seen.jpg'" in first.stderr
    assert "not recorded: line 9: 'mole' is not one of the nine diagnoses" in first.stderr
    again = invoke("outcome", "import", str(table), "--config", str(config_file))
    assert "0 recorded, 0 changed, 6 already known, 2 not recorded" in again.stdout

    assert invoke("report", "--config", str(config_file)).exit_code == 0
    (day_json,) = settings.paths.reports.glob("*.json")
    outcomes = json.loads(day_json.read_text())["outcomes"]
    flagged_melanomas = sum(by_name[n].flagged for n in names[:3])
    flagged = sum(p.flagged for p in by_name.values())
    assert outcomes == {
        "confirmed": 6, "melanoma": 3, "melanoma_flagged": flagged_melanomas, "flagged": flagged,
        "sensitivity": flagged_melanomas / 3, "ppv": flagged_melanomas / flagged if flagged else None,
    }


def test_a_reviewed_flag_shows_who_looked_and_an_unreviewed_one_says_not_yet(
        tmp_path: Path, flag_everything_model: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\npath = "{flag_everything_model}"\n[database]\nurl = "sqlite:///d.db"\n')
    for i in range(2):
        write_jpeg(tmp_path / "in" / f"spot-{i}.jpg", seed=300 + i)
    assert invoke("process", "--config", str(config), str(tmp_path / "in")).exit_code == 0
    marked = invoke("review", "spot-0.jpg", "--by", "dr.alice", "--config", str(config))
    assert marked.exit_code == 0 and "1 image(s) marked reviewed by dr.alice" in marked.stdout
    missing = invoke("review", "abcdef1234567890", "--config", str(config))
    assert missing.exit_code == 1 and "no image with sha256 abcdef1234567890" in missing.stderr
    assert invoke("report", "--config", str(config)).exit_code == 0
    (page,) = (tmp_path / "var" / "reports").glob("2*.html")
    html = page.read_text()
    assert "by dr.alice" in html and html.count("not yet</strong>") == 1
    (day_json,) = (tmp_path / "var" / "reports").glob("*.json")
    rows = json.loads(day_json.read_text())["rows"]
    assert sorted(row["reviewed_by"] for row in rows) == ["", "dr.alice"]
    assert all(Path(row["archive_path"]).is_file() for row in rows)


def test_the_drift_warning_needs_a_large_excess_on_enough_images() -> None:
    assert binomial_upper_tail(0, 10, 0.3) == pytest.approx(1.0)
    assert binomial_upper_tail(10, 10, 0.5) == pytest.approx(0.5 ** 10)
    assert drift_warning(alert_rate(40, 30, 0.2)) is not None  # 75 % against 20 %
    assert drift_warning(alert_rate(40, 11, 0.2)) is None  # 27 %: within chance
    assert drift_warning(alert_rate(10, 9, 0.2)) is None  # too few images to say
    assert drift_warning(alert_rate(40, 30, None)) is None  # nothing to compare with
    assert "flagged 30 of 40 images today (75%)" in drift_warning(alert_rate(40, 30, 0.2))


def test_a_flag_rate_far_above_expected_is_warned_about_everywhere(
        config_file: Path, flag_everything_model: Path, start_service) -> None:
    from datetime import datetime

    from conftest import wait_until

    from dermwatch.config import load_settings
    from dermwatch.modelcard import load_card
    from dermwatch.store.db import ensure_schema
    from dermwatch.store.models import utc_now

    text = config_file.read_text()
    config_file.write_text(text.split("[model]")[0] + f'[model]\npath = "{flag_everything_model}"\nthreads = 1\n'
                           + "[watcher]" + text.split("[watcher]")[1] + "[reports]\nquiet_seconds = 1\n")
    settings = load_settings(config_file)
    engine = make_engine(settings.database_url)
    ensure_schema(engine)
    card = load_card(flag_everything_model)
    with Session(engine) as session, session.begin():  # a calibration under which 5 % were flagged
        session.add(SiteThreshold(model_sha256=card.sha256, created_at=utc_now(), threshold=1e-6,
                                  target_sensitivity=0.9, method="images", source="test", images=100,
                                  melanomas=10, sensitivity=0.9, sensitivity_low=0.7, sensitivity_high=1.0,
                                  specificity=0.99, specificity_low=0.95, specificity_high=1.0, flag_rate=0.05))
    service = start_service()
    for i in range(25):
        write_jpeg(settings.paths.intake / f"drift-{i:02d}.jpg", seed=700 + i, size=(48, 40))
    wait_until(lambda: any("warning (alert rate): the alert flagged 25 of 25" in s for s in service.statuses()),
               90, "a drift warning in STATUS=")
    status = json.loads(invoke("status", "--config", str(config_file), "--json").stdout)
    assert status["alert_rate_today"] == {"images": 25, "flagged": 25, "rate": 1.0, "expected": 0.05}
    assert "far above the 5%" in status["drift_warning"]
    today = datetime.now(settings.reports.timezone).date().isoformat()
    assert "far above the 5%" in (settings.paths.reports / f"{today}.html").read_text()
    assert service.stop() == 0


def test_a_calibration_or_an_outcome_reaches_the_running_service_within_a_minute(
        config_file: Path, tmp_path: Path, start_service) -> None:
    config_file.write_text(config_file.read_text() + "[reports]\nquiet_seconds = 1\n")
    settings = load_settings(config_file)
    service = start_service()
    for i in range(8):
        write_jpeg(settings.paths.intake / f"visit-{i}.jpg", seed=100 + i)
    day_json = settings.paths.reports / f"{datetime.now(settings.reports.timezone).date()}.json"

    def report() -> dict:
        return json.loads(day_json.read_text()) if day_json.exists() else {}

    wait_until(lambda: report().get("images") == 8, 60, "today's report with the 8 images")
    assert report()["threshold_source"].startswith("model card")

    source = labelled_folder(tmp_path / "site", {"melanoma": 12, "nevus": 15})
    result = invoke("calibrate", str(source), "--config", str(config_file))
    assert result.exit_code == 0, result.output
    assert "(was 0.5000, the model card's)" in result.stdout and "not validated" not in result.output
    assert "the running service shows this in today's report within a minute" in result.stdout
    with Session(make_engine(settings.database_url)) as session:
        site = session.scalars(select(SiteThreshold)).one()
    wait_until(lambda: report().get("threshold") == site.threshold, 60, "the site threshold in today's report")
    document = report()
    assert document["threshold_source"].startswith("site calibration of ")
    scored = [row for row in document["rows"] if row["sha256"]]
    assert len(scored) == 8 and all(row["flagged"] == (row["melanoma_score"] >= site.threshold) for row in scored)
    assert document["flagged"] == sum(row["flagged"] for row in scored)
    status = json.loads(invoke("status", "--config", str(config_file), "--json").stdout)
    assert status["threshold"] == site.threshold and status["threshold_source"] == document["threshold_source"]

    outcomes = tmp_path / "outcomes.csv"
    outcomes.write_text("file_name,diagnosis\nvisit-3.jpg,melanoma\n")
    imported = invoke("outcome", "import", str(outcomes), "--config", str(config_file))
    assert imported.exit_code == 0, imported.output
    wait_until(lambda: report().get("outcomes", {}).get("confirmed") == 1, 60, "the outcome in today's report")
    assert service.stop() == 0


def test_without_a_service_calibrate_and_outcome_import_rewrite_todays_report(
        config_file: Path, tmp_path: Path) -> None:
    settings = load_settings(config_file)
    source = labelled_folder(tmp_path / "site", {"melanoma": 12, "nevus": 15})
    assert invoke("process", "--config", str(config_file), str(source / "nevus")).exit_code == 0
    result = invoke("calibrate", str(source), "--config", str(config_file))
    assert result.exit_code == 0, result.output
    assert f"from {source}\n" in result.stdout  # the path as given
    day_json = settings.paths.reports / f"{datetime.now(settings.reports.timezone).date()}.json"
    assert f"today's report refreshed: {day_json.with_suffix('.html')}" in result.stdout
    assert json.loads(day_json.read_text())["threshold_source"].startswith("site calibration of ")
    outcomes = tmp_path / "outcomes.csv"
    outcomes.write_text("file_name,diagnosis\nnev-00.jpg,nevus\n")
    assert invoke("outcome", "import", str(outcomes), "--config", str(config_file)).exit_code == 0
    assert json.loads(day_json.read_text())["outcomes"]["confirmed"] == 1
