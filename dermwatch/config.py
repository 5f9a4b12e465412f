"""config.toml -> frozen, validated settings.

Every key has a default that works on one machine as-is; an unknown key or a wrong type
is an error that names the key. Relative paths resolve against the config file's folder
(or the working directory when there is no file).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from datetime import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from dermwatch.errors import ConfigError

CONFIG_ENV = "DERMWATCH_CONFIG"
#: settle_seconds when polling and the config does not set it: a copy over SMB or NFS can
#: pause for seconds, and polling cannot see a file being closed.
POLLING_SETTLE_SECONDS = 5.0

#: Every section and key, with its default. The shipped config.toml documents the same.
DEFAULTS: dict[str, dict[str, Any]] = {
    "paths": {"intake": "var/intake", "state": "var/state", "reports": "var/reports"},
    "database": {"url": "sqlite:///var/dermwatch.db", "busy_timeout_seconds": 30.0, "worker_lease_seconds": 30.0},
    "model": {"path": "", "threads": 2, "batch_size": 64},
    "watcher": {
        "settle_seconds": 1.0,
        "rescan_seconds": 60.0,
        "polling": False,
        "incomplete_seconds": 30.0,
        "sidecar_grace_seconds": 10.0,
    },
    "images": {"max_pixels": 50_000_000},
    "site": {"name": "dermwatch", "timezone": "UTC"},
    "reports": {"daily_at": "18:00", "refresh_minutes": 15.0, "quiet_seconds": 30.0, "cpu_share": 0.25},
    "alerts": {
        "include_reference": False,
        "command": "",
        "smtp_host": "",
        "smtp_port": 587,
        "smtp_starttls": True,
        "smtp_user": "",
        "smtp_password_env": "DERMWATCH_SMTP_PASSWORD",
        "mail_from": "",
        "mail_to": [],
        "retry_minutes": 5.0,
        "digest_minutes": 0.0,
    },
}


@dataclass(frozen=True)
class PathSettings:
    intake: Path
    state: Path
    reports: Path
    intake_configured: bool = False  # config.toml names another than the default: missing, it is a typo

    @property
    def work(self) -> Path:
        return self.state / "work"

    @property
    def archive(self) -> Path:
        return self.state / "archive"

    @property
    def quarantine(self) -> Path:
        return self.state / "quarantine"


@dataclass(frozen=True)
class ModelSettings:
    path: Path | None  # None: the model shipped inside the package
    threads: int
    batch_size: int  # most images stored in one transaction (and per interpreter call in `classify`)


@dataclass(frozen=True)
class WatcherSettings:
    settle_seconds: float
    rescan_seconds: float
    polling: bool
    incomplete_seconds: float  # a JPEG/PNG without its end marker waits this long unchanged before it is taken
    sidecar_grace_seconds: float  # a sidecar may come this long after its image


@dataclass(frozen=True)
class ReportSettings:
    site_name: str
    timezone: ZoneInfo  # what "today" means, and the days reports cover
    daily_at: time  # local time of the daily report
    refresh_minutes: float  # while images keep arriving, today's report is refreshed at least this often
    quiet_seconds: float  # and once no image has arrived for this long (the end of a burst)
    cpu_share: float  # of one core, for the service's report pictures (reports/budget.py)


@dataclass(frozen=True)
class AlertSettings:
    include_reference: bool  # put patient/lesion references into alert messages
    command: str  # run for each flagged image; empty: none
    smtp_host: str  # empty: no e-mail
    smtp_port: int
    smtp_starttls: bool
    smtp_user: str
    smtp_password_env: str  # the password is read from this environment variable
    mail_from: str
    mail_to: tuple[str, ...]
    retry_minutes: float
    digest_minutes: float  # 0: one alert per flagged image; else one message per window

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(name for name, on in (("email", bool(self.smtp_host)), ("command", bool(self.command))) if on)


@dataclass(frozen=True)
class Settings:
    paths: PathSettings
    database_url: str
    busy_timeout_seconds: float  # SQLite: how long a write waits for a lock before the service backs off
    worker_lease_seconds: float  # PostgreSQL: a worker silent this long is dead; others finish its files
    model: ModelSettings
    watcher: WatcherSettings
    max_pixels: int
    reports: ReportSettings
    alerts: AlertSettings
    source: Path | None  # the config file read, if any


def load_settings(path: Path | None = None) -> Settings:
    """Read ``path``, else $DERMWATCH_CONFIG, else ./config.toml if present, else defaults."""
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    if path is None and Path("config.toml").is_file():
        path = Path("config.toml")
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path} is not valid TOML: {error}") from None
    values = _merge(raw, path)
    if values["watcher"]["polling"] and "settle_seconds" not in raw.get("watcher", {}):
        values["watcher"]["settle_seconds"] = POLLING_SETTLE_SECONDS
    base = path.resolve().parent if path else Path.cwd()
    # The default intake is made on first start (the quick start, whose config.toml names it);
    # another one named in the config must already exist.
    intake_configured = raw.get("paths", {}).get("intake", DEFAULTS["paths"]["intake"]) != DEFAULTS["paths"]["intake"]
    return _build(values, base, path.resolve() if path else None, intake_configured=intake_configured)


def _merge(raw: dict[str, Any], path: Path | None) -> dict[str, dict[str, Any]]:
    where = path or "config"
    merged = {section: dict(keys) for section, keys in DEFAULTS.items()}
    for section, keys in raw.items():
        if section not in DEFAULTS:
            raise ConfigError(f"{where}: unknown section [{section}] (known: {', '.join(DEFAULTS)})")
        if not isinstance(keys, dict):
            raise ConfigError(f"{where}: [{section}] must be a table")
        for key, value in keys.items():
            if key not in DEFAULTS[section]:
                raise ConfigError(f"{where}: unknown key [{section}] {key}")
            merged[section][key] = _checked(f"[{section}] {key}", value, DEFAULTS[section][key], where)
    return merged


#: Numbers for which 0 means "off" rather than a mistake.
MAY_BE_ZERO = frozenset({"[alerts] digest_minutes"})


def _checked(name: str, value: Any, default: Any, where: Path | str) -> Any:
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not expected:
        raise ConfigError(f"{where}: {name} must be a {expected.__name__}, got {value!r}")
    if expected in (int, float) and name in MAY_BE_ZERO and value < 0:
        raise ConfigError(f"{where}: {name} must be 0 or more, got {value!r}")
    if expected in (int, float) and name not in MAY_BE_ZERO and value <= 0:
        raise ConfigError(f"{where}: {name} must be positive, got {value!r}")
    if expected is list and not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{where}: {name} must be a list of strings, got {value!r}")
    return value


def _build(values: dict[str, dict[str, Any]], base: Path, source: Path | None, *, intake_configured: bool) -> Settings:
    paths = values["paths"]
    model = values["model"]
    watcher = values["watcher"]
    return Settings(
        paths=PathSettings(**{key: _resolve(base, paths[key]) for key in ("intake", "state", "reports")},
                           intake_configured=intake_configured),
        database_url=_database_url(values["database"]["url"], base),
        busy_timeout_seconds=values["database"]["busy_timeout_seconds"],
        worker_lease_seconds=values["database"]["worker_lease_seconds"],
        model=ModelSettings(
            path=_resolve(base, model["path"]) if model["path"] else None,
            threads=model["threads"],
            batch_size=model["batch_size"],
        ),
        watcher=WatcherSettings(**watcher),
        max_pixels=values["images"]["max_pixels"],
        reports=_report_settings(values["site"], values["reports"]),
        alerts=_alert_settings(values["alerts"]),
        source=source,
    )


def _report_settings(site: dict[str, Any], reports: dict[str, Any]) -> ReportSettings:
    try:
        zone = ZoneInfo(site["timezone"])
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"[site] timezone {site['timezone']!r} is not a time zone name like 'Europe/Berlin'"
        ) from None
    try:
        daily_at = time.fromisoformat(reports["daily_at"])
    except ValueError:
        raise ConfigError(f"[reports] daily_at {reports['daily_at']!r} is not a time like '18:00'") from None
    if reports["cpu_share"] > 1:
        raise ConfigError(f"[reports] cpu_share is a share of one core, at most 1, got {reports['cpu_share']!r}")
    return ReportSettings(site_name=site["name"], timezone=zone, daily_at=daily_at,
                          refresh_minutes=reports["refresh_minutes"], quiet_seconds=reports["quiet_seconds"],
                          cpu_share=reports["cpu_share"])


def _alert_settings(alerts: dict[str, Any]) -> AlertSettings:
    settings = AlertSettings(**{**alerts, "mail_to": tuple(alerts["mail_to"])})
    if settings.smtp_host and not (settings.mail_from and settings.mail_to):
        raise ConfigError("[alerts] smtp_host is set, so mail_from and mail_to must be set too")
    return settings


def _resolve(base: Path, value: str) -> Path:
    return (base / Path(value).expanduser()).resolve()


def _database_url(url: str, base: Path) -> str:
    """Resolve a relative SQLite file against ``base``; leave every other URL alone."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"[database] url {url!r} is not a SQLAlchemy database URL") from None
    if parsed.get_backend_name() == "sqlite" and (parsed.host or parsed.port):
        raise ConfigError(
            f"[database] url {url!r}: a SQLite URL has no host; write three slashes before a relative path "
            f"(sqlite:///var/dermwatch.db) and four before an absolute one (sqlite:////srv/dermwatch/dermwatch.db)")
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return url
    return parsed.set(database=str(_resolve(base, parsed.database))).render_as_string(hide_password=False)


def check_intake(paths: PathSettings, *, create: bool = False) -> None:
    """A configured intake folder must exist: watching a new, empty folder named with a typo
    would look like a quiet day. The default one is made on first start (the quick start)."""
    if paths.intake_configured and not create and not paths.intake.is_dir():
        what = "is not a folder" if paths.intake.exists() else "does not exist"
        raise ConfigError(f"[paths] intake: {paths.intake} {what} (a typo? create it, or start the service once "
                          "with `dermwatch run --create-intake`)")


def ensure_folders(settings: Settings) -> None:
    """Create the service's folders; fail with the config key when one is not writable."""
    folders = {
        "[paths] intake": settings.paths.intake,
        "[paths] state": settings.paths.state,
        "[paths] reports": settings.paths.reports,
    }
    for key, folder in folders.items():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"{key}: cannot create {folder} ({error.strerror})") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}: {folder} is not writable by this user")
    for folder in (settings.paths.work, settings.paths.archive, settings.paths.quarantine):
        folder.mkdir(exist_ok=True)
