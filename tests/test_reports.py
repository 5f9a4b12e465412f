"""The daily report: sections, files, time zones, escaping, a real browser, alerts, the schedule."""

from __future__ import annotations

import csv
import json
import re
import shutil
import signal
import socket
import subprocess
import time as clock
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta, timezone
from html import unescape as html_unescape
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from conftest import status_json, wait_until, write_jpeg
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from dermwatch.config import ReportSettings, Settings, load_settings
from dermwatch.labels import CLASS_NAMES
from dermwatch.modelcard import load_card
from dermwatch.pipeline.classifier import load_classifier
from dermwatch.reports.render import Reporter
from dermwatch.store.db import ensure_schema, make_engine
from dermwatch.store.models import Alert, Prediction, Rejection, Sighting, probability_column
from dermwatch.store.models import Image as ImageRow
from dermwatch.watcher.schedule import ReportSchedule

BERLIN = ZoneInfo("Europe/Berlin")
DAY = date(2026, 3, 14)
MARKUP_NAME = "<img src=x onerror=alert(1)>.jpg"


@pytest.fixture
def berlin_config(config_file: Path) -> Path:
    config_file.write_text(config_file.read_text() + '[site]\nname = "Praxis Süd"\ntimezone = "Europe/Berlin"\n')
    return config_file


def add_image(settings: Settings, engine, name: str, *, seed: int, melanoma: float, top: str,
              received_local: datetime, sidecar: dict | None = None) -> None:
    """A classified image as the pipeline leaves it: archived file plus its rows."""
    card = load_card(settings.model.path)
    archive = settings.paths.archive / "test" / f"{seed:012d}-{name.replace('/', '_')}"
    write_jpeg(archive, seed=seed, size=(400, 300))
    probabilities = dict.fromkeys(CLASS_NAMES, 0.0)
    probabilities["melanoma"] = melanoma
    probabilities[top] = probabilities.get(top, 0.0) + (1 - melanoma) * 0.8
    probabilities["nevus"] += 1 - sum(probabilities.values())
    received = received_local.astimezone(timezone.utc)
    with Session(engine) as session, session.begin():
        image = ImageRow(sha256=f"{seed:064d}", original_name=name, received_at=received,
                         processed_at=received, bytes=1, format="JPEG", width=400, height=300,
                         archive_path=str(archive))
        session.add_all([
            image,
            Sighting(image=image, claim=f"claim-{seed}", original_name=name, received_at=received, sidecar=sidecar),
            Prediction(image=image, model_version=card.version, model_sha256=card.sha256, created_at=received,
                       top_label=max(probabilities, key=probabilities.get), melanoma_score=melanoma,
                       threshold=card.melanoma_threshold, flagged=melanoma >= card.melanoma_threshold,
                       **{probability_column(k): v for k, v in probabilities.items()}),
        ])


def add_rejection(engine, name: str, reason: str, when_local: datetime) -> None:
    with Session(engine) as session, session.begin():
        session.add(Rejection(claim=f"r-{name}", original_name=name, reason=reason,
                              rejected_at=when_local.astimezone(timezone.utc), quarantine_path="/q/" + name))


@pytest.fixture
def day_of_images(berlin_config: Path):
    settings = load_settings(berlin_config)
    engine = make_engine(settings.database_url)
    ensure_schema(engine)
    at = lambda h, m: datetime.combine(DAY, time(h, m), BERLIN)  # noqa: E731
    add_image(settings, engine, "back-mole.jpg", seed=1, melanoma=0.91, top="melanoma", received_local=at(9, 5),
              sidecar={"patient_reference": "P-0042", "body_site": "upper back"})
    add_image(settings, engine, MARKUP_NAME, seed=2, melanoma=0.62, top="melanoma", received_local=at(10, 0))
    add_image(settings, engine, "arm.jpg", seed=3, melanoma=0.05, top="nevus", received_local=at(11, 0))
    add_image(settings, engine, "nose.jpg", seed=4, melanoma=0.02, top="basal cell carcinoma",
              received_local=at(12, 0))
    add_image(settings, engine, "late.jpg", seed=5, melanoma=0.01, top="dermatofibroma", received_local=at(23, 30))
    add_image(settings, engine, "next-day.jpg", seed=6, melanoma=0.7, top="melanoma",
              received_local=datetime.combine(DAY + timedelta(days=1), time(0, 30), BERLIN))
    add_rejection(engine, "scan.jpg", "damaged or truncated image: image file is truncated", at(13, 0))
    reporter = Reporter(settings, engine, load_classifier(settings.model.path, threads=1))
    return settings, reporter


def test_a_day_renders_every_section_in_order(day_of_images) -> None:
    settings, reporter = day_of_images
    rendered = reporter.render(DAY)
    html = rendered.html.read_text().replace("<wbr>", "")  # names may wrap after separators
    order = [html.index(marker) for marker in (
        "Praxis Süd", "Suspected melanoma (2)", "back-mole.jpg", "&lt;img src=x onerror=alert(1)&gt;.jpg",
        "Other images (3)", "Basal cell carcinoma (", "arm.jpg", "Could not be read (1)", "scan.jpg",
        "image file is truncated", "By most likely class", "decision support, not a diagnosis")]
    assert order == sorted(order)
    assert "P-0042" in html and "upper back" in html and "09:05:00" in html
    patients = html.split('<section id="by-patient">')[1].split("</section>")[0]
    assert "P-0042" in patients and "back-mole.jpg" in patients and "arm.jpg" not in patients
    assert "next-day.jpg" not in html
    assert html.count("data:image/jpeg;base64,") == 2 * 2 + 3  # thumbnail and heatmap per flagged image
    assert "times in Europe/Berlin" in html
    assert (rendered.images, rendered.flagged, rendered.rejected) == (5, 2, 1)


def test_the_header_counts_the_held_out_melanomas_the_threshold_caught() -> None:
    from dermwatch.modelcard import shipped_model_path
    from dermwatch.reports.render import threshold_words
    from dermwatch.site.threshold import unvalidated

    card = load_card(shipped_model_path())
    held_out = card.document["evaluation"]["sets"]["test_leak_free"]
    total = held_out["melanoma_images"]
    caught = round(held_out["melanoma_sensitivity"] * total)
    words = threshold_words(card, unvalidated(card))
    assert f"P(melanoma) ≥ {card.melanoma_threshold:.3f} are flagged" in words
    assert f"it caught {caught} of {total} melanomas" in words and "%" not in words.split("(on held-out")[1]


def test_csv_and_json_hold_the_same_rows(day_of_images) -> None:
    _, reporter = day_of_images
    rendered = reporter.render(DAY)
    with rendered.csv.open(newline="") as handle:
        from_csv = list(csv.DictReader(handle))
    document = json.loads(rendered.json.read_text())
    assert [r["original_name"] for r in from_csv] == [r["original_name"] for r in document["rows"]] == [
        "back-mole.jpg", MARKUP_NAME, "nose.jpg", "arm.jpg", "late.jpg", "scan.jpg"]
    assert [r["status"] for r in from_csv] == ["flagged", "flagged", "classified", "classified", "classified",
                                               "rejected"]
    assert float(from_csv[0]["melanoma_score"]) == document["rows"][0]["melanoma_score"] == 0.91
    assert from_csv[0]["patient_reference"] == "P-0042"
    assert (document["images"], document["flagged"], document["rejected"]) == (5, 2, 1)


def test_day_boundaries_follow_the_configured_time_zone(day_of_images) -> None:
    _, reporter = day_of_images
    names = [r["original_name"] for r in json.loads(reporter.render(DAY).json.read_text())["rows"]]
    assert "late.jpg" in names  # 23:30 in Berlin is 22:30 UTC: still this local day
    following = json.loads(reporter.render(DAY + timedelta(days=1)).json.read_text())["rows"]
    assert [r["original_name"] for r in following] == ["next-day.jpg"]  # 00:30 Berlin is the day before in UTC


def test_markup_in_a_file_name_is_text_and_the_page_has_no_script(day_of_images) -> None:
    _, reporter = day_of_images
    html = reporter.render(DAY).html.read_text()
    assert "<img src=x" not in html and "onerror=alert(1)>" not in html
    assert "<script" not in html.lower()
    assert "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\"" in html


def test_rerendering_a_day_gives_the_same_files(day_of_images) -> None:
    _, reporter = day_of_images
    first = reporter.render(DAY)
    before = [p.read_bytes() for p in (first.html, first.csv, first.json)]
    second = reporter.render(DAY)
    assert [p.read_bytes() for p in (second.html, second.csv, second.json)] == before


def test_index_lists_every_day(day_of_images) -> None:
    settings, reporter = day_of_images
    reporter.render(DAY)
    reporter.render(DAY + timedelta(days=1))
    index = (settings.paths.reports / "index.html").read_text()
    assert index.index("2026-03-15.html") < index.index("2026-03-14.html")
    assert "<strong>2</strong>" in index


def test_thumbnails_carry_no_metadata_and_fit_their_size(day_of_images) -> None:
    settings, reporter = day_of_images
    reporter.render(DAY)
    for side in (256, 96):
        thumbnails = list((settings.paths.state / "cache" / f"thumbnails-{side}").iterdir())
        assert thumbnails
        for path in thumbnails:
            with Image.open(path) as image:
                assert max(image.size) == side  # the 400x300 originals shrink to this
                assert not image.getexif() and "icc_profile" not in image.info and "comment" not in image.info
            assert not image.getexif() and "icc_profile" not in image.info and "comment" not in image.info


def test_real_chromium_shows_the_flagged_section(day_of_images, tmp_path: Path) -> None:
    assert shutil.which("chromium"), "this test needs Debian's chromium (apt-get install chromium; .ci/run does)"
    _, reporter = day_of_images
    html = reporter.render(DAY).html
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", html.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<section id="suspected-melanoma">' in dom.stdout and dom.stdout.count('<article class="case">') == 2
    console = "\n".join(line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Content Security" in line)
    assert "Refused" not in console and "Content Security Policy" not in console, console
    screenshot = tmp_path / "report.png"
    shot = subprocess.run(["chromium", *flags, "--window-size=1000,1400", f"--screenshot={screenshot}",
                           html.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0, shot.stderr[-2000:]
    with Image.open(screenshot) as image:
        assert image.size == (1000, 1400)
        pixels = np.asarray(image.convert("RGB"))
    # The flagged section's red frame and heading are on screen in the first page view.
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 60) & (pixels[..., 2] < 80)
    assert red[:700].sum() > 2000


def test_pictures_keep_their_aspect_ratio_in_real_chromium(day_of_images, tmp_path: Path) -> None:
    """A stretched lesion shows a false asymmetry: every picture must keep its shape (4:3 here)."""
    assert shutil.which("chromium"), "this test needs Debian's chromium (apt-get install chromium; .ci/run does)"
    _, reporter = day_of_images
    page = reporter.render(DAY).html.read_text()
    # A copy of the page that measures itself: the report's own policy allows no script.
    probe = """<script>window.onload = () => { document.body.setAttribute('data-sizes', JSON.stringify(
      [...document.images].map(i => [i.clientWidth, i.clientHeight, i.naturalWidth, i.naturalHeight]))); };</script>"""
    measured = tmp_path / "measured.html"
    measured.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
                        .replace("</body>", probe + "</body>"))
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400",
                          "--virtual-time-budget=5000", "--dump-dom", measured.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    sizes = json.loads(html_unescape(re.search(r'data-sizes="([^"]*)"', dom.stdout).group(1)))
    assert len(sizes) == 2 * 2 + 3
    for shown_width, shown_height, width, height in sizes:
        assert width / height == pytest.approx(4 / 3, rel=0.02)
        assert shown_width / shown_height == pytest.approx(width / height, rel=0.02)


def print_to_pdf(html: Path, tmp_path: Path) -> Path:
    """The page as real chromium prints it, without its own header and footer."""
    pdf = tmp_path / "report.pdf"
    printed = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              f"--user-data-dir={tmp_path / 'profile'}", "--no-pdf-header-footer",
                              f"--print-to-pdf={pdf}", html.as_uri()], capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr[-2000:]
    return pdf


def test_every_printed_page_names_the_site_and_the_day(day_of_images, tmp_path: Path) -> None:
    from pypdf import PdfReader

    assert shutil.which("chromium"), "this test needs Debian's chromium (apt-get install chromium; .ci/run does)"
    _, reporter = day_of_images
    pages = [page.extract_text() for page in PdfReader(print_to_pdf(reporter.render(DAY).html, tmp_path)).pages]
    assert len(pages) >= 2
    assert all("Praxis Süd · dermoscopy report 2026-03-14" in text for text in pages)


def test_schedule_rules() -> None:
    settings = ReportSettings(site_name="x", timezone=BERLIN, daily_at=time(18, 0), refresh_minutes=15,
                              quiet_seconds=30, cpu_share=0.25)
    morning = datetime(2026, 3, 14, 9, 0, tzinfo=BERLIN)
    schedule = ReportSchedule(settings, {})
    yesterday, today = date(2026, 3, 13), date(2026, 3, 14)
    latest = {yesterday: morning - timedelta(hours=20), today: morning - timedelta(seconds=5)}
    assert schedule.due(morning, latest) == [yesterday]  # a past day at once; today waits for the burst to end
    schedule.mark(yesterday, morning)
    assert schedule.due(morning + timedelta(seconds=26), latest) == [today]  # 31 s without an arrival
    schedule.mark(today, morning + timedelta(seconds=26))
    # A steady stream, one image every 10 s: never quiet, so refreshed every refresh_minutes.
    start = morning + timedelta(seconds=30)
    renders = []
    for tick in range(0, 40 * 60, 10):
        now = start + timedelta(seconds=tick)
        latest[today] = now
        if schedule.due(now, latest):
            schedule.mark(today, now)
            renders.append(tick)
    assert renders == [15 * 60, 30 * 60 + 10]  # 15 min after it first fell behind again
    # The stream ends: the report follows within quiet_seconds.
    end = latest[today]
    assert schedule.due(end + timedelta(seconds=29), latest) == []
    assert schedule.due(end + timedelta(seconds=31), latest) == [today]
    schedule.mark(today, end + timedelta(seconds=31))
    evening = datetime(2026, 3, 14, 18, 0, 1, tzinfo=BERLIN)
    assert schedule.due(evening, latest) == [today]  # daily report, even with nothing new


def test_a_restart_rewrites_a_report_older_than_the_database() -> None:
    settings = ReportSettings(site_name="x", timezone=BERLIN, daily_at=time(18, 0), refresh_minutes=15,
                              quiet_seconds=30, cpu_share=0.25)
    now = datetime(2026, 3, 14, 10, 0, tzinfo=BERLIN)
    written = now - timedelta(minutes=3)  # mid-burst, before the service stopped
    schedule = ReportSchedule(settings, {date(2026, 3, 14): written})
    assert schedule.due(now, {date(2026, 3, 14): now - timedelta(minutes=2)}) == [date(2026, 3, 14)]


def smtp_server():
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Message

    class Inbox(Message):
        def __init__(self) -> None:
            super().__init__()
            self.messages = []

        def handle_message(self, message) -> None:
            self.messages.append(message)

    inbox = Inbox()
    with socket.socket() as probe:  # a free port on the loopback interface
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    return controller, inbox


def alert_config(config_file: Path, port: int, include_reference: bool) -> Settings:
    config_file.write_text(config_file.read_text() + f"""
[site]
name = "Praxis Nord"
[alerts]
smtp_host = "127.0.0.1"
smtp_port = {port}
smtp_starttls = false
mail_from = "dermwatch@praxis.example"
mail_to = ["derm@praxis.example"]
include_reference = {"true" if include_reference else "false"}
retry_minutes = 0.001
""")
    return load_settings(config_file)


def flagged_arrival(settings: Settings) -> None:
    """Process one image with the threshold of the tiny model's card lowered so it is flagged."""
    from dermwatch.pipeline.process import open_processor

    processor = open_processor(settings)
    object.__setattr__(processor.card, "melanoma_threshold", 1e-6)
    image = write_jpeg(settings.paths.intake / "shoulder.jpg", seed=77)
    (settings.paths.intake / "shoulder.json").write_text('{"patient_reference": "P-7", "body_site": "shoulder"}')
    (outcome,) = processor.process([processor.claim(image)])
    assert "FLAGGED" in outcome.detail


@pytest.mark.parametrize("include_reference", [False, True])
def test_flagged_image_alert_reaches_a_real_smtp_server(config_file: Path, include_reference: bool) -> None:
    from dermwatch.alerts import send_pending

    controller, inbox = smtp_server()
    try:
        settings = alert_config(config_file, controller.port, include_reference)
        flagged_arrival(settings)
        engine = make_engine(settings.database_url)
        assert send_pending(engine, settings.alerts, "Praxis Nord", settings.reports.timezone) == 1
        (message,) = inbox.messages
    finally:
        controller.stop()
    assert message["To"] == "derm@praxis.example"
    assert message["Subject"].startswith("[Praxis Nord] suspected melanoma: P=")
    assert "shoulder.jpg" in message["Subject"]
    body = message.get_payload()
    assert "shoulder.jpg" in body and "not a diagnosis" in body
    assert ("P-7" in body) is include_reference


def test_a_nul_or_lone_surrogate_in_a_reference_is_alerted_escaped(config_file: Path, tmp_path: Path) -> None:
    """A NUL cannot go into a command's environment: it is escaped, and the image is alerted."""
    from dermwatch.alerts import send_pending

    script = tmp_path / "alert.sh"
    script.write_text('#!/bin/sh\nprintf %s "$DERMWATCH_PATIENT_REFERENCE" > "$0.out"\n')
    script.chmod(0o700)
    config_file.write_text(config_file.read_text() + f"""
[alerts]
command = "{script}"
include_reference = true
""")
    settings = load_settings(config_file)
    from dermwatch.pipeline.process import open_processor

    processor = open_processor(settings)
    object.__setattr__(processor.card, "melanoma_threshold", 1e-6)
    image = write_jpeg(settings.paths.intake / "shoulder.jpg", seed=78)
    (settings.paths.intake / "shoulder.json").write_text('{"patient_reference": "P\\u0000X\\udc80"}')
    processor.process([processor.claim(image)])
    engine = make_engine(settings.database_url)
    assert send_pending(engine, settings.alerts, "Praxis Nord", settings.reports.timezone) == 1
    assert (tmp_path / "alert.sh.out").read_text() == "P\\x00X\\udc80"


def test_an_alert_resent_after_a_crash_has_its_id_and_says_it_may_repeat(config_file: Path, tmp_path: Path) -> None:
    """Killed after the command ran, before sent_at was committed: the resend carries the same id."""
    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from dermwatch.alerts import _claim, send_pending
    from dermwatch.store.models import Alert, utc_now

    controller, inbox = smtp_server()
    script = tmp_path / "alert.sh"
    script.write_text('#!/bin/sh\necho "$DERMWATCH_ALERT_ID $DERMWATCH_MAY_BE_REPEAT" >> "$0.out"\n')
    script.chmod(0o700)
    try:
        settings = alert_config(config_file, controller.port, False)
        config_file.write_text(config_file.read_text().replace("[alerts]\n", f'[alerts]\ncommand = "{script}"\n'))
        settings = load_settings(config_file)
        flagged_arrival(settings)
        engine = make_engine(settings.database_url)
        with Session(engine) as session:  # a first try whose process died: claimed, never recorded
            for alert_id in session.scalars(select(Alert.id)).all():
                assert _claim(session, alert_id)
            session.execute(update(Alert).values(next_attempt_at=utc_now()))  # its claim lapsed
            session.commit()
        assert send_pending(engine, settings.alerts, "Praxis Nord", settings.reports.timezone) == 2
        (message,) = inbox.messages
    finally:
        controller.stop()
    with Session(engine) as session:
        ids = {a.channel: a.id for a in session.scalars(select(Alert))}
    assert (tmp_path / "alert.sh.out").read_text() == f"{ids['command']} yes\n"
    assert message["Message-ID"] == f"<dermwatch-alert-{ids['email']}@praxis.example>"
    assert "(may repeat)" in message["Subject"] and f"Alert id:      {ids['email']}" in message.get_payload()


def test_a_digest_sends_one_mail_and_one_command_run_for_a_burst(tmp_path: Path, flag_everything_model: Path) -> None:
    from dermwatch.alerts import send_pending

    controller, inbox = smtp_server()
    script = tmp_path / "alert.sh"
    script.write_text('#!/bin/sh\ncat > "$0.$DERMWATCH_DIGEST_COUNT.json"\n')
    script.chmod(0o700)
    config = tmp_path / "config.toml"
    config.write_text(f"""
[model]
path = "{flag_everything_model}"
[alerts]
smtp_host = "127.0.0.1"
smtp_port = {controller.port}
smtp_starttls = false
mail_from = "dermwatch@praxis.example"
mail_to = ["derm@praxis.example"]
command = "{script}"
digest_minutes = 0.03
""")
    settings = load_settings(config)
    for i in range(5):
        write_jpeg(tmp_path / "drop" / f"burst-{i}.jpg", seed=500 + i)
    try:
        from click.testing import CliRunner

        from dermwatch.cli import cli

        # process sends what is due at its end: within the window, nothing yet.
        assert CliRunner().invoke(cli, ["process", "--config", str(config), str(tmp_path / "drop")]).exit_code == 0
        assert inbox.messages == []
        engine = make_engine(settings.database_url)
        clock.sleep(2)
        assert send_pending(engine, settings.alerts, "Praxis Nord", settings.reports.timezone) == 10
        assert send_pending(engine, settings.alerts, "Praxis Nord", settings.reports.timezone) == 0
        # A later flag waits for its own window: the alerts already sent do not make it due.
        write_jpeg(tmp_path / "later" / "later.jpg", seed=520)
        assert CliRunner().invoke(cli, ["process", "--config", str(config), str(tmp_path / "later")]).exit_code == 0
        assert send_pending(engine, settings.alerts, "Praxis Nord", settings.reports.timezone) == 0
        assert len(inbox.messages) == 1
    finally:
        controller.stop()
    (message,) = inbox.messages
    subject = " ".join(message["Subject"].split())  # long headers come folded
    assert subject == "[Praxis Nord] suspected melanoma: 5 images flagged in the last 0.03 min"
    assert all(f"burst-{i}.jpg" in message.get_payload() for i in range(5))
    (run,) = tmp_path.glob("alert.sh.*.json")
    assert run.name == "alert.sh.5.json"
    assert sorted(facts["FILE_NAME"] for facts in json.loads(run.read_text())) == [f"burst-{i}.jpg" for i in range(5)]


def test_failed_alert_is_kept_and_retried(config_file: Path, tmp_path: Path) -> None:
    from dermwatch.alerts import send_pending

    controller, inbox = smtp_server()
    port = controller.port
    controller.stop()  # nothing listens there now
    settings = alert_config(config_file, port, False)
    flagged_arrival(settings)
    engine = make_engine(settings.database_url)
    assert send_pending(engine, settings.alerts, "x", settings.reports.timezone) == 0
    with Session(engine) as session:
        alert = session.scalars(select(Alert)).one()
        assert alert.attempts == 1 and alert.sent_at is None and "SMTP 127.0.0.1" in alert.last_error
    from aiosmtpd.controller import Controller

    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        clock.sleep(0.2)
        assert send_pending(engine, settings.alerts, "x", settings.reports.timezone) == 1
    finally:
        controller.stop()
    assert len(inbox.messages) == 1


def test_an_alert_that_keeps_failing_is_a_fault_in_status_until_it_goes_out(
        config_file: Path, tmp_path: Path, tiny_model: Path, flag_everything_model: Path, start_service) -> None:
    """A command that is not there cannot be cured by retrying: `status` shows it with its error
    (and the count); once the configuration is mended (SIGHUP), the alert goes out and the fault clears."""
    out = tmp_path / "alerted.txt"
    good = config_file.read_text().replace(str(tiny_model), str(flag_everything_model))
    config_file.write_text(good + """
[alerts]
command = "/nonexistent/page-the-dermatologist"
retry_minutes = 0.01
""")
    settings = load_settings(config_file)
    service = start_service()
    write_jpeg(settings.paths.intake / "back.jpg", seed=61)

    wait_until(lambda: "alert delivery" in status_json(config_file)["faults"], 60, "the failing alert shown as a fault")
    shown = status_json(config_file)
    assert shown["alerts_failing"] == 1 and "/nonexistent/page-the-dermatologist" in shown["alert_error"]
    assert "1 alert(s) not delivered" in shown["faults"]["alert delivery"]["message"]
    assert "No such file or directory" in shown["faults"]["alert delivery"]["message"]

    config_file.write_text(good + f"""
[alerts]
command = "sh -c 'echo $DERMWATCH_FILE_NAME > {out}'"
retry_minutes = 0.01
""")
    service.process.send_signal(signal.SIGHUP)
    wait_until(lambda: out.exists() and status_json(config_file)["faults"] == {}, 60, "alert sent, fault cleared")
    assert out.read_text() == "back.jpg\n" and status_json(config_file)["alerts_failing"] == 0
    assert service.stop() == 0


def test_alert_command_gets_the_facts_in_its_environment(config_file: Path, tmp_path: Path) -> None:
    from dermwatch.alerts import send_pending

    out = tmp_path / "alert.env"
    config_file.write_text(config_file.read_text() + f"""
[alerts]
command = "sh -c 'env | grep ^DERMWATCH_ | sort > {out}'"
""")
    settings = load_settings(config_file)
    flagged_arrival(settings)
    assert send_pending(make_engine(settings.database_url), settings.alerts, "x", settings.reports.timezone) == 1
    facts = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert facts["DERMWATCH_FILE_NAME"] == "shoulder.jpg" and float(facts["DERMWATCH_MELANOMA_SCORE"]) > 0
    assert "DERMWATCH_PATIENT_REFERENCE" not in facts


def test_service_writes_todays_report_on_its_schedule(config_file: Path, start_service) -> None:
    config_file.write_text(config_file.read_text() + "[reports]\nrefresh_minutes = 0.02\n")
    settings = load_settings(config_file)
    service = start_service()
    today = datetime.now(settings.reports.timezone).date()
    report = settings.paths.reports / f"{today.isoformat()}.json"
    write_jpeg(settings.paths.intake / "first.jpg", seed=91)
    wait_until(lambda: report.exists() and json.loads(report.read_text())["images"] == 1, 30, "first report")
    write_jpeg(settings.paths.intake / "second.jpg", seed=92)
    wait_until(lambda: json.loads(report.read_text())["images"] == 2, 30, "refreshed report")
    assert (settings.paths.reports / "index.html").is_file()
    assert service.stop() == 0


def test_todays_report_waits_for_the_end_of_a_burst(config_file: Path, start_service) -> None:
    config_file.write_text(config_file.read_text() + "[reports]\nquiet_seconds = 2\n")
    settings = load_settings(config_file)
    service = start_service()
    today = datetime.now(settings.reports.timezone).date()
    report = settings.paths.reports / f"{today.isoformat()}.json"
    seen: set[int] = set()

    def look() -> None:  # every count a report has shown; a mid-burst one would stay for over 2 s
        try:
            seen.add(json.loads(report.read_text())["images"])
        except (OSError, ValueError):
            pass

    for i in range(12):  # a burst: one file every 0.5 s, never 2 s apart
        write_jpeg(settings.paths.intake / f"burst-{i:02d}.jpg", seed=600 + i)
        for _ in range(5):
            look()
            clock.sleep(0.1)
    wait_until(lambda: look() or 12 in seen, 60, "today's report after the burst")
    assert seen - {0} == {12}  # (0: the daily report, when the test runs after daily_at)
    assert service.stop() == 0


def test_service_writes_missing_past_reports_at_start_up(berlin_config: Path, start_service) -> None:
    settings = load_settings(berlin_config)
    engine = make_engine(settings.database_url)
    ensure_schema(engine)
    add_image(settings, engine, "old.jpg", seed=8, melanoma=0.9, top="melanoma",
              received_local=datetime.combine(DAY, time(15, 0), BERLIN))
    engine.dispose()
    service = start_service()
    wait_until(lambda: (settings.paths.reports / "2026-03-14.html").exists(), 30, "the missing report")
    assert service.stop() == 0


def test_report_command_renders_the_chosen_day(day_of_images, berlin_config: Path) -> None:
    from click.testing import CliRunner

    from dermwatch.cli import cli

    settings, _ = day_of_images
    result = CliRunner().invoke(cli, ["report", "--config", str(berlin_config), "--date", "2026-03-14"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        f"{settings.paths.reports / '2026-03-14.html'}: 5 images, 2 suspected melanoma, 1 could not be read")
    bad = CliRunner().invoke(cli, ["report", "--config", str(berlin_config), "--date", "14.03.2026"])
    assert bad.exit_code == 2 and "14.03.2026" in bad.stderr


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(berlin_config: Path) -> None:
    settings = load_settings(berlin_config)
    engine = make_engine(settings.database_url)
    ensure_schema(engine)
    formulas = {"patient_reference": "=HYPERLINK(\"http://x\",\"P\")", "lesion_reference": "+1+1",
                "body_site": "@SUM(A1)", "notes": "\tnote"}
    add_image(settings, engine, "-2+3.jpg", seed=7, melanoma=0.9, top="melanoma",
              received_local=datetime.combine(DAY, time(9), BERLIN), sidecar=formulas)
    rendered = Reporter(settings, engine, None).render(DAY)
    with rendered.csv.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert all(not cell.startswith(("=", "+", "-", "@", "\t", "\r")) for row in rows for cell in row)
    (row,) = list(csv.DictReader(rendered.csv.open(newline="")))
    assert row["patient_reference"] == "'" + formulas["patient_reference"] and row["original_name"] == "'-2+3.jpg"
    assert json.loads(rendered.json.read_text())["rows"][0]["patient_reference"] == formulas["patient_reference"]


def test_a_lone_surrogate_or_nul_in_a_sidecar_never_stops_the_report(berlin_config: Path) -> None:
    """Stored as given; escaped where it leaves: the page, the CSV and the JSON are written."""
    settings = load_settings(berlin_config)
    engine = make_engine(settings.database_url)
    ensure_schema(engine)
    odd = {"patient_reference": "P\udc80", "lesion_reference": "L\x00X", "notes": " \n=1+1"}
    add_image(settings, engine, "odd.jpg", seed=8, melanoma=0.9, top="melanoma",
              received_local=datetime.combine(DAY, time(9), BERLIN), sidecar=odd)
    rendered = Reporter(settings, engine, None).render(DAY)
    page = rendered.html.read_text()
    assert "P\\udc80" in page and "L\\x00X" in page
    (row,) = list(csv.DictReader(rendered.csv.open(newline="")))
    assert row["patient_reference"] == "P\\udc80" and row["notes"] == "' \n=1+1"  # a formula after a line break
    assert json.loads(rendered.json.read_text())["rows"][0]["patient_reference"] == "P\udc80"


def test_one_image_for_two_patients_shows_both_in_every_format(berlin_config: Path) -> None:
    settings = load_settings(berlin_config)
    engine = make_engine(settings.database_url)
    ensure_schema(engine)
    add_image(settings, engine, "mole.jpg", seed=8, melanoma=0.9, top="melanoma",
              received_local=datetime.combine(DAY, time(9), BERLIN), sidecar={"patient_reference": "P-A"})
    with Session(engine) as session, session.begin():
        image = session.scalars(select(ImageRow)).one()
        session.add(Sighting(image=image, claim="again", original_name="mole-copy.jpg",
                             received_at=datetime.combine(DAY, time(10), BERLIN).astimezone(timezone.utc),
                             sidecar={"patient_reference": "P-B", "notes": "sent again by the GP"}))
    rendered = Reporter(settings, engine, None).render(DAY)
    rows = list(csv.DictReader(rendered.csv.open(newline="")))
    assert [(r["original_name"], r["patient_reference"]) for r in rows] == [("mole.jpg", "P-A"),
                                                                          ("mole-copy.jpg", "P-B")]
    document = json.loads(rendered.json.read_text())
    assert [r["patient_reference"] for r in document["rows"]] == ["P-A", "P-B"] and document["images"] == 1
    html = rendered.html.read_text()
    assert "P-A" in html and "P-B" in html and "sent again by the GP" in html


def test_the_heatmap_leaves_the_dark_dermatoscope_border_out() -> None:
    from dermwatch.reports.pictures import dark_cells

    pixels = np.full((64, 64, 3), 170, np.uint8)  # skin
    yy, xx = np.mgrid[:64, :64]
    pixels[(yy - 31.5) ** 2 + (xx - 31.5) ** 2 > 30 ** 2] = 5  # the round scope's black surround
    dark = dark_cells(pixels, np.linspace(0, 64, 9).round().astype(int))
    assert dark[0, 0] and dark[0, 7] and dark[7, 0] and dark[7, 7]  # corners are border
    assert not dark[2:6, 2:6].any()  # the middle is skin


def _burn(seconds: float) -> None:
    started = clock.thread_time()
    while clock.thread_time() - started < seconds:
        pass


def test_report_pictures_rest_to_stay_within_their_share_of_a_core() -> None:
    from dermwatch.reports.budget import CpuBudget

    budget = CpuBudget(share=0.25)
    started = clock.monotonic()
    with budget.spend():
        _burn(0.1)
    assert clock.monotonic() - started >= 0.1 / 0.25 * 0.95  # 0.1 s of CPU, then 0.3 s of rest


def test_a_stop_ends_the_pictures_rest_at_once() -> None:
    import threading

    from dermwatch.reports.budget import CpuBudget

    stopping = threading.Event()
    stopping.set()
    started = clock.monotonic()
    with CpuBudget(share=0.01, stopping=stopping).spend():
        _burn(0.05)
    assert clock.monotonic() - started < 3  # not the 5 s of rest 0.05 s at 1 % would ask for


def test_the_service_heatmaps_keep_to_the_configured_share(tmp_path: Path, tiny_model: Path) -> None:
    import threading

    from dermwatch.reports.budget import CpuBudget
    from dermwatch.reports.pictures import Pictures

    classifier = load_classifier(tiny_model, threads=1)
    pictures = Pictures(tmp_path / "cache", classifier, max_pixels=10**8, stopping=threading.Event(),
                        budget=CpuBudget(share=0.2))
    photos = [write_jpeg(tmp_path / f"p{i}.jpg", seed=i, size=(800, 600)) for i in range(3)]
    cpu, wall = clock.thread_time(), clock.monotonic()
    for photo in photos:
        assert pictures.heatmap(str(photo), f"sha-{photo.stem}", classifier.card.sha256) is not None
    cpu, wall = clock.thread_time() - cpu, clock.monotonic() - wall
    assert wall >= cpu / 0.2 * 0.9


def test_a_newline_in_a_name_cannot_forge_a_log_line() -> None:
    import io
    import logging

    from dermwatch.logs import OneLine

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(OneLine())
    logger = logging.getLogger("dermwatch.test-one-line")
    logger.addHandler(handler)
    try:
        logger.warning("rejected %s", "x.jpg\nINFO dermwatch: all is well\udc80")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "rejected x.jpg\\x0aINFO dermwatch: all is well\\udc80\n"


def test_a_name_with_hash_or_percent_links_to_its_own_file(berlin_config: Path) -> None:
    from urllib.parse import unquote

    settings = load_settings(berlin_config)
    engine = make_engine(settings.database_url)
    ensure_schema(engine)
    add_image(settings, engine, "mole #2 100%.jpg", seed=9, melanoma=0.9, top="melanoma",
              received_local=datetime.combine(DAY, time(9), BERLIN))
    rendered = Reporter(settings, engine, None).render(DAY)
    links = re.findall(r'href="([^"]+\.jpg)"', rendered.html.read_text())
    assert links and all("#" not in link and "%25" in link for link in links)
    assert all((rendered.html.parent / unquote(link)).is_file() for link in links)


def _site_threshold(engine, card, value: float) -> None:
    """A site calibration row, as `dermwatch calibrate` stores it, putting ``value`` in force."""
    from dermwatch.store.models import SiteThreshold

    with Session(engine) as session, session.begin():
        session.add(SiteThreshold(
            model_sha256=card.sha256, created_at=datetime.now(timezone.utc), threshold=value, target_sensitivity=0.9,
            method="images", source="site", images=40, melanomas=12, sensitivity=0.92, sensitivity_low=0.7,
            sensitivity_high=0.99, specificity=0.5, specificity_low=0.3, specificity_high=0.7, flag_rate=0.4))


def test_the_report_lists_as_suspected_exactly_the_images_at_the_threshold_in_force(day_of_images) -> None:
    settings, reporter = day_of_images  # stored on arrival under the card's 0.5: 0.91 and 0.62 flagged
    engine = reporter.engine

    _site_threshold(engine, reporter.card, 0.7)
    html = reporter.render(DAY).html.read_text()
    suspected = html.split('<section id="suspected-melanoma">')[1].split("</section>")[0]
    others = html.split('<section id="other-images">')[1].split("</section>")[0]
    assert "P(melanoma) ≥ 0.700 are flagged" in html and "Suspected melanoma (1)" in suspected
    assert "back-mole.jpg" in suspected and "onerror" not in suspected
    assert "onerror" in others and "Alerted on arrival under an earlier threshold (0.500)" in others
    document = json.loads(settings.paths.reports.joinpath(f"{DAY}.json").read_text())
    assert document["threshold"] == 0.7 and document["flagged"] == 1
    assert all(row["flagged"] == (row["melanoma_score"] >= 0.7) for row in document["rows"] if row["sha256"])

    _site_threshold(engine, reporter.card, 0.03)  # newer, and lower: arm.jpg (0.05) is suspected now
    html = reporter.render(DAY).html.read_text()
    suspected = html.split('<section id="suspected-melanoma">')[1].split("</section>")[0]
    assert "Suspected melanoma (3)" in suspected and "arm.jpg" in suspected
    assert suspected.count("Not alerted on arrival: the threshold in force then was 0.500.") == 1
    assert "earlier threshold" not in html


def test_no_markdown_reaches_the_page(day_of_images) -> None:
    _, reporter = day_of_images
    assert "`" not in reporter.render(DAY).html.read_text()


def test_tables_keep_words_whole_on_screen_and_in_print(day_of_images, tmp_path: Path) -> None:
    """At 1,000 to 1,600 px, and on paper, no word of a table is split across lines ("Not es")."""
    from pypdf import PdfReader

    assert shutil.which("chromium"), "this test needs Debian's chromium (apt-get install chromium; .ci/run does)"
    settings, reporter = day_of_images
    at = datetime.combine(DAY, time(14, 0), BERLIN)
    add_image(settings, reporter.engine, "ISIC_0024306_dermoscopy_left-shoulder_2026-03-14.jpg", seed=7,
              melanoma=0.04, top="pigmented benign keratosis", received_local=at,
              sidecar={"patient_reference": "P-0043", "lesion_reference": "L-2", "body_site": "left shoulder",
                       "notes": "Notes from the referring practice about this lesion's history"})
    page = reporter.render(DAY).html.read_text()
    # A copy of the page that finds every word drawn on more than one line: the report's own
    # policy allows no script.
    probe = """<script>window.onload = () => {
      const broken = [];
      for (const cell of document.querySelectorAll('th, td')) {
        const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
        for (let node = walker.nextNode(); node; node = walker.nextNode()) {
          for (const match of node.data.matchAll(/[^\\s_\\-.\\/]+/g)) {
            const range = document.createRange();
            range.setStart(node, match.index);
            range.setEnd(node, match.index + match[0].length);
            const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
            if (tops.size > 1) broken.push(match[0]);
          }
        }
      }
      document.body.setAttribute('data-broken', JSON.stringify(broken)); };</script>"""
    measured = tmp_path / "measured.html"
    measured.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
                        .replace("</body>", probe + "</body>"))
    for width in (1000, 1400, 1600):
        dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={width},1400",
                              "--virtual-time-budget=5000", "--dump-dom", measured.as_uri()],
                             capture_output=True, text=True, timeout=120)
        assert dom.returncode == 0, dom.stderr[-2000:]
        broken = json.loads(html_unescape(re.search(r'data-broken="([^"]*)"', dom.stdout).group(1)))
        assert broken == [], f"at {width} px: {broken}"
    printed = PdfReader(print_to_pdf(reporter.render(DAY).html, tmp_path))
    words = set(" ".join(page.extract_text() for page in printed.pages).split())
    for word in ("Notes", "Received", "Original", "Patient", "referring", "practice", "history", "shoulder"):
        assert word in words or f"{word}." in words, f"{word} is split on paper"


def test_a_page_written_in_chunks_replaces_the_old_one_whole_or_not_at_all(tmp_path: Path) -> None:
    """The day's page is streamed to disk chunk by chunk; a render that fails half-way (a
    picture that cannot be drawn, the service stopping) leaves yesterday's file as it was."""
    from dermwatch.reports.atomic import write_atomically

    page = tmp_path / "2026-12-07.html"
    write_atomically(page, (chunk.encode() for chunk in ["<html>", "ä" * 3, "</html>"]))
    assert page.read_text() == "<html>äää</html>"

    def failing() -> Iterator[bytes]:
        yield b"<html>half"
        raise RuntimeError("a picture could not be drawn")

    with pytest.raises(RuntimeError):
        write_atomically(page, failing())
    assert page.read_text() == "<html>äää</html>"
    assert [path.name for path in tmp_path.iterdir()] == [page.name]
