"""Engine and session set-up, and the Alembic schema checks the service relies on.

The only SQLite-specific code of the project lives here: WAL journal, busy timeout and
foreign keys, set on every new connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dermwatch.errors import DatabaseError

#: What each SQLAlchemy back-end needs installed, for the message when it is missing.
_DRIVER_HINTS = {
    "postgresql": "pip install 'dermwatch[postgres]' and write the URL as postgresql+psycopg://user@host/dbname",
}


def make_engine(url: str, busy_timeout_seconds: float = 30.0, *, create: bool = True) -> Engine:
    """An engine for ``url``; for a SQLite file, create its folder and turn on WAL.

    With ``create=False`` a SQLite file that does not exist is an error instead: commands
    that only look (status, report) never set up an installation by accident.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return _checked_engine(url, pool_pre_ping=True)
    if parsed.database not in (None, "", ":memory:"):
        database = Path(parsed.database)
        if not create and not database.exists():
            raise DatabaseError(
                f"no database at {database}: nothing has run with this configuration yet "
                "(start the service with `dermwatch run`, or pass the service's --config)"
            )
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DatabaseError(f"[database] url: cannot create {database.parent} ({error.strerror})") from None
    engine = _checked_engine(url, connect_args={"timeout": busy_timeout_seconds})
    busy_ms = int(busy_timeout_seconds * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def _checked_engine(url: str, **options) -> Engine:
    """create_engine, with a wrong dialect name or a missing driver said in one line."""
    parsed = make_url(url)
    try:
        return create_engine(url, **options)
    except NoSuchModuleError:
        hint = " (PostgreSQL is postgresql+psycopg://…)" if parsed.drivername.startswith("postgres") else ""
        raise DatabaseError(f"[database] url: SQLAlchemy has no database type {parsed.drivername!r}{hint}") from None
    except ImportError as error:
        fix = _DRIVER_HINTS.get(parsed.get_backend_name(), f"install the Python driver for {parsed.drivername}")
        raise DatabaseError(f"[database] url needs a driver that is not installed ({error.name}): {fix}") from None


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("dermwatch") / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as error:
        detail = getattr(error, "orig", None) or error
        raise DatabaseError(f"cannot open the database: {error.__class__.__name__}: {detail}") from None


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest revision shipped with this version."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


#: pg_advisory_lock key that serialises schema set-up: "dmschema" as a 64-bit integer.
_SCHEMA_LOCK = 0x646D736368656D61


@contextmanager
def _schema_lock(engine: Engine) -> Iterator[None]:
    """On PostgreSQL, one process at a time sets up the schema: workers starting together
    on an empty database would otherwise both create it. SQLite needs nothing: one service."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _SCHEMA_LOCK})
        connection.commit()
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _SCHEMA_LOCK})
            connection.commit()


def ensure_schema(engine: Engine) -> None:
    """Create the schema in an empty database; refuse one at an older revision.

    A new database is set up on first start so that the service runs on its defaults;
    an existing one is never migrated behind the operator's back.
    """
    with _schema_lock(engine):
        current = current_revision(engine)
        if current == head_revision():
            return
        if current is None and not inspect(engine).get_table_names():
            upgrade(engine)
            return
    raise DatabaseError(
        f"database schema is at revision {current or 'none'}, this version needs {head_revision()}: "
        "run `dermwatch db upgrade` (back up the database first)"
    )
