"""Immediate alerts for flagged images: e-mail over SMTP and/or a command.

Alerts are queued in the database in the same transaction as the prediction, and sent
from here, outside the intake path: a slow or failing mail server delays nothing but
the alert, which is logged and retried every ``retry_minutes``.

Each alert is claimed by one atomic UPDATE before it is sent, so the service and a
`dermwatch process` beside it (or, later, several workers) never send one alert twice.
"""

from __future__ import annotations

import logging
import os
import shlex
import smtplib
import ssl
import subprocess
from datetime import timedelta
from email.message import EmailMessage

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from dermwatch.config import AlertSettings
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
    return facts


def _arrival_sidecar(prediction) -> dict[str, str] | None:
    """The sidecar of the arrival that was classified (the image's first arrival with one)."""
    sightings = sorted(prediction.image.sightings, key=lambda s: s.id)
    return next((s.sidecar for s in sightings if s.sidecar), None)


def _send_mail(facts: dict[str, str], settings: AlertSettings, site_name: str) -> None:
    message = EmailMessage()
    message["Subject"] = f"[{site_name}] suspected melanoma: P={facts['MELANOMA_SCORE']} in {facts['FILE_NAME']}"
    message["From"] = settings.mail_from
    message["To"] = ", ".join(settings.mail_to)
    lines = [
        f"dermwatch at {site_name} flagged an image as possible melanoma.",
        "",
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
    environment = {**os.environ, **{f"DERMWATCH_{key}": value for key, value in facts.items()}}
    try:
        result = subprocess.run(shlex.split(settings.command), env=environment, capture_output=True, text=True,
                                timeout=COMMAND_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise AlertError(f"command {settings.command!r}: {error}") from None
    if result.returncode != 0:
        raise AlertError(f"command {settings.command!r} exited {result.returncode}: {result.stderr.strip()[-300:]}")
