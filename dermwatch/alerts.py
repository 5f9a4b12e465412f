"""Immediate alerts for flagged images: e-mail over SMTP and/or a command.

Alerts are queued in the database in the same transaction as the prediction, and sent
from here, outside the intake path: a slow or failing mail server delays nothing but
the alert, which is logged and retried every ``retry_minutes``.

Each alert is claimed by one atomic UPDATE before it is sent, so the service and a
`dermwatch process` beside it (or, later, several workers) never send one alert twice.

Delivery is at least once. A process killed after the mail or command went out but before
``sent_at`` was committed sends again once its claim lapses. Every alert therefore carries
a stable id (``DERMWATCH_ALERT_ID``; in the e-mail's Message-ID and body) so a receiver can
drop a repeat, and a resend after such a crash says it may be one.

With ``digest_minutes`` > 0, alerts wait until the oldest one owed on a channel is that old,
and then go out together: one e-mail, or one command run, listing every image flagged in
the window. A drop of forty files then makes one message, not forty.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import smtplib
import ssl
import subprocess
from datetime import timedelta
from email.message import EmailMessage

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from dermwatch.config import AlertSettings
from dermwatch.safe_text import shown
from dermwatch.store.models import Alert, utc_now

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_SECONDS = 60
SMTP_TIMEOUT_SECONDS = 30
#: A claimed alert is not offered to anyone else for this long: longer than any one try
#: takes. A process that dies mid-send leaves it to be retried after that.
CLAIM_LEASE = timedelta(minutes=5)


class AlertError(Exception):
    """One attempt failed; the message says why, for the log and the alert row."""


def send_pending(engine: Engine, settings: AlertSettings, site_name: str, zone) -> int:
    """Try every alert that is due and that this process manages to claim; return how many were sent."""
    if settings.digest_minutes > 0:
        return _send_digests(engine, settings, site_name, zone)
    sent = 0
    with Session(engine) as session:
        due = session.scalars(
            select(Alert.id).where(Alert.sent_at.is_(None), Alert.next_attempt_at <= utc_now()).order_by(Alert.id)
        ).all()
        session.commit()
        for alert_id in due:
            if not _claim(session, alert_id):
                continue  # another process took it
            alert = session.get(Alert, alert_id)
            try:
                _send(alert, settings, site_name, zone)
            except AlertError as error:
                alert.last_error = str(error)
                alert.next_attempt_at = utc_now() + timedelta(minutes=settings.retry_minutes)
                log.error("alert %d (%s) failed, retrying in %g min: %s", alert.id, alert.channel,
                          settings.retry_minutes, error)
            else:
                alert.sent_at = utc_now()
                alert.last_error = None
                sent += 1
                log.info("alert %d sent by %s", alert.id, alert.channel)
            session.commit()
    return sent


def _send_digests(engine: Engine, settings: AlertSettings, site_name: str, zone) -> int:
    """Per channel: once its oldest alert owed is ``digest_minutes`` old, send all due ones as one."""
    sent = 0
    window = timedelta(minutes=settings.digest_minutes)
    with Session(engine) as session:
        for channel in settings.channels:
            now = utc_now()
            # The oldest alert still owed on this channel (sent ones do not hold a digest back).
            oldest = session.scalar(select(func.min(Alert.created_at))
                                    .where(Alert.channel == channel, Alert.sent_at.is_(None)))
            if oldest is None or now - oldest < window:
                continue
            due = session.scalars(select(Alert.id).where(Alert.channel == channel, Alert.sent_at.is_(None),
                                                         Alert.next_attempt_at <= now).order_by(Alert.id)).all()
            alerts = [session.get(Alert, alert_id) for alert_id in due if _claim(session, alert_id)]
            if not alerts:
                continue
            try:
                _send_digest(channel, [_facts(alert, settings, zone) for alert in alerts], settings, site_name)
            except AlertError as error:
                for alert in alerts:
                    alert.last_error = str(error)
                    alert.next_attempt_at = utc_now() + timedelta(minutes=settings.retry_minutes)
                log.error("digest of %d alerts (%s) failed, retrying in %g min: %s", len(alerts), channel,
                          settings.retry_minutes, error)
            else:
                for alert in alerts:
                    alert.sent_at, alert.last_error = utc_now(), None
                sent += len(alerts)
                log.info("digest of %d alerts sent by %s", len(alerts), channel)
            session.commit()
    return sent


def _send_digest(channel: str, images: list[dict[str, str]], settings: AlertSettings, site_name: str) -> None:
    if channel == "email":
        _send_digest_mail(images, settings, site_name)
    elif channel == "command":
        _run_digest_command(images, settings)
    else:
        raise AlertError(f"channel {channel!r} is not configured any more")


def _claim(session: Session, alert_id: int) -> bool:
    """Take one due alert for this process: true for exactly one of any processes that try."""
    now = utc_now()
    result = session.execute(
        update(Alert)
        .where(Alert.id == alert_id, Alert.sent_at.is_(None), Alert.next_attempt_at <= now)
        .values(next_attempt_at=now + CLAIM_LEASE, attempts=Alert.attempts + 1)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1


def _send(alert: Alert, settings: AlertSettings, site_name: str, zone) -> None:
    facts = _facts(alert, settings, zone)
    if alert.channel == "email":
        _send_mail(facts, settings, site_name)
    elif alert.channel == "command":
        _run_command(facts, settings)
    else:
        raise AlertError(f"channel {alert.channel!r} is not configured any more")


def _facts(alert: Alert, settings: AlertSettings, zone) -> dict[str, str]:
    prediction = alert.prediction
    image = prediction.image
    facts = {
        "ALERT_ID": str(alert.id),
        # Claimed before (attempts counts claims), and no error came back: the last try may
        # have been delivered before its process died.
        "MAY_BE_REPEAT": "yes" if alert.attempts > 1 and alert.last_error is None else "no",
        "IMAGE_ID": str(image.id),
        "MELANOMA_SCORE": f"{prediction.melanoma_score:.4f}",
        "THRESHOLD": f"{prediction.threshold:.4f}",
        "FILE_NAME": image.original_name,
        "ARCHIVE_PATH": image.archive_path,
        "RECEIVED_AT": image.received_at.astimezone(zone).isoformat(timespec="seconds"),
        "MODEL": f"{prediction.model_version} ({prediction.model_sha256[:12]})",
    }
    sidecar = _arrival_sidecar(prediction)
    if settings.include_reference and sidecar:
        facts["PATIENT_REFERENCE"] = sidecar.get("patient_reference", "")
        facts["LESION_REFERENCE"] = sidecar.get("lesion_reference", "")
        facts["BODY_SITE"] = sidecar.get("body_site", "")
    # Into a command's environment and an e-mail: no NUL, no lone surrogate, no line break.
    return {key: shown(value) for key, value in facts.items()}


def _arrival_sidecar(prediction) -> dict[str, str] | None:
    """The sidecar of the arrival that was classified (the image's first arrival with one)."""
    sightings = sorted(prediction.image.sightings, key=lambda s: s.id)
    return next((s.sidecar for s in sightings if s.sidecar), None)


def _send_digest_mail(images: list[dict[str, str]], settings: AlertSettings, site_name: str) -> None:
    message = EmailMessage()
    count = f"{len(images)} image{'s' if len(images) != 1 else ''}"
    window = f"{settings.digest_minutes:g} min"
    repeat = any(facts["MAY_BE_REPEAT"] == "yes" for facts in images)
    message["Subject"] = (f"[{site_name}] {'(may repeat) ' if repeat else ''}suspected melanoma: {count} flagged "
                          f"in the last {window}")
    message["Message-ID"] = _message_id("digest-" + "-".join(facts["ALERT_ID"] for facts in images), settings)
    lines = [f"dermwatch at {site_name} flagged {count} as possible melanoma:", *([REPEAT_NOTE] if repeat else []),
             ""]
    for facts in images:
        lines.append(f"- {facts['FILE_NAME']}: P(melanoma) {facts['MELANOMA_SCORE']} "
                     f"(threshold {facts['THRESHOLD']}), received {facts['RECEIVED_AT']}, alert {facts['ALERT_ID']}")
        references = [facts.get(key) for key in ("PATIENT_REFERENCE", "LESION_REFERENCE", "BODY_SITE")]
        if any(references):
            lines.append("  " + " / ".join(filter(None, references)))
        lines.append(f"  archived at {facts['ARCHIVE_PATH']}")
    lines += ["", "Decision support, not a diagnosis: please review the images in today's report."]
    message.set_content("\n".join(lines) + "\n")
    _deliver(message, settings)


def _send_mail(facts: dict[str, str], settings: AlertSettings, site_name: str) -> None:
    message = EmailMessage()
    repeat = facts["MAY_BE_REPEAT"] == "yes"
    message["Subject"] = (f"[{site_name}] {'(may repeat) ' if repeat else ''}suspected melanoma: "
                          f"P={facts['MELANOMA_SCORE']} in {facts['FILE_NAME']}")
    message["Message-ID"] = _message_id(f"alert-{facts['ALERT_ID']}", settings)
    lines = [
        f"dermwatch at {site_name} flagged an image as possible melanoma.",
        *([REPEAT_NOTE] if repeat else []),
        "",
        f"Alert id:      {facts['ALERT_ID']}",
        f"File:          {facts['FILE_NAME']}",
        f"P(melanoma):   {facts['MELANOMA_SCORE']} (alert threshold {facts['THRESHOLD']})",
        f"Received:      {facts['RECEIVED_AT']}",
        f"Image id:      {facts['IMAGE_ID']}",
        f"Archived at:   {facts['ARCHIVE_PATH']}",
        f"Model:         {facts['MODEL']}",
    ]
    for key, label in (("PATIENT_REFERENCE", "Patient"), ("LESION_REFERENCE", "Lesion"), ("BODY_SITE", "Body site")):
        if facts.get(key):
            lines.append(f"{label + ':':<15}{facts[key]}")
    lines += ["", "Decision support, not a diagnosis: please review the image."]
    message.set_content("\n".join(lines) + "\n")
    _deliver(message, settings)


REPEAT_NOTE = ("This may repeat an alert already sent: the service stopped before it could record the "
               "sending. Same alert id, same alert.")


def _message_id(key: str, settings: AlertSettings) -> str:
    """The same Message-ID every time this alert (or digest) is sent: a receiver can drop repeats."""
    domain = settings.mail_from.rpartition("@")[2] or "dermwatch.invalid"
    if len(key) > 64:  # a long digest: the ids' digest keeps the header short and still stable
        key = "digest-" + hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"<dermwatch-{key}@{domain}>"


def _deliver(message: EmailMessage, settings: AlertSettings) -> None:
    message["From"] = settings.mail_from
    message["To"] = ", ".join(settings.mail_to)
    password = os.environ.get(settings.smtp_password_env, "") if settings.smtp_user else ""
    if settings.smtp_user and not password:
        raise AlertError(f"[alerts] smtp_user is set but ${settings.smtp_password_env} is empty")
    try:
        with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=SMTP_TIMEOUT_SECONDS) as smtp:
            if settings.smtp_starttls:
                smtp.starttls(context=ssl.create_default_context())
            if settings.smtp_user:
                smtp.login(settings.smtp_user, password)
            smtp.send_message(message)
    except (OSError, smtplib.SMTPException) as error:
        raise AlertError(f"SMTP {settings.smtp_host}:{settings.smtp_port}: {error}") from None


def _run_command(facts: dict[str, str], settings: AlertSettings) -> None:
    _run(settings, {f"DERMWATCH_{key}": value for key, value in facts.items()}, stdin="")


def _run_digest_command(images: list[dict[str, str]], settings: AlertSettings) -> None:
    """One run for the whole digest: the count and file names in the environment, every
    image's facts as a JSON list on standard input."""
    names = "\n".join(facts["FILE_NAME"] for facts in images)
    _run(settings, {"DERMWATCH_DIGEST_COUNT": str(len(images)), "DERMWATCH_FILE_NAMES": names,
                    "DERMWATCH_ALERT_IDS": ",".join(facts["ALERT_ID"] for facts in images),
                    "DERMWATCH_MAY_BE_REPEAT": "yes" if any(f["MAY_BE_REPEAT"] == "yes" for f in images) else "no"},
         stdin=json.dumps(images))


def _run(settings: AlertSettings, variables: dict[str, str], stdin: str) -> None:
    environment = {**os.environ, **variables}
    try:
        result = subprocess.run(shlex.split(settings.command), env=environment, input=stdin, capture_output=True,
                                text=True, timeout=COMMAND_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise AlertError(f"command {settings.command!r}: {error}") from None
    if result.returncode != 0:
        raise AlertError(f"command {settings.command!r} exited {result.returncode}: {result.stderr.strip()[-300:]}")
