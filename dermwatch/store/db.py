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
from sqlalchemy.exc import NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dermwatch.errors import DatabaseError, DermwatchError, TransientFault

#: What each SQLAlchemy back-end needs installed, for the message when it is missing.
_DRIVER_HINTS = {
    "postgresql": "pip install 'dermwatch[postgres]' and write the URL as postgresql+psycopg://user@host/dbname",
}


def make_engine(url: str, busy_timeout_seconds: float = 30.0, *, create: bool = True,
                session_name: str | None = None) -> Engine:
    """An engine for ``url``; for a SQLite file, create its folder and turn on WAL.

    With ``create=False`` a SQLite file that does not exist is an error instead: commands
    that only look (status, report) never set up an installation by accident. A server's
    sessions carry ``session_name`` as their application_name (pipeline/workers.py).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        named = {"connect_args": {"application_name": session_name}} if session_name else {}
        return _checked_engine(url, pool_pre_ping=True, **named)
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


def check_url(url: str) -> None:
    """The URL's database type and driver, checked without connecting or creating anything."""
    _checked_engine(url).dispose()


#: Refusals by a server that is there but cannot take a connection yet: waited out.
_BUSY_SERVER = ("the database system is", "too many connections", "remaining connection slots")
#: What to do about each refusal that is a mistake in the settings, not a passing fault.
_REFUSAL_HINTS = {
    "password authentication failed": "check the user and password in the URL",
    "Peer authentication failed": "peer authentication: run dermwatch as the operating-system user that the URL "
                                  "names (runuser -u NAME -- dermwatch ...), or give it a password",
    "no pg_hba.conf entry": "allow this user, database and host in the server's pg_hba.conf",
    "role": "create the role (as the postgres user: createuser NAME)",
    "database": "create the database (as the postgres user: createdb -O ROLE NAME)",
}


def connection_problem(error: OperationalError) -> DermwatchError:
    """A failed connection as one line: a mistake in [database] url (the server refused it:
    unknown database or role, wrong password) or a passing fault (no server there yet, busy)."""
    detail = " ".join(str(error.orig or error).split())
    if "FATAL:" in detail:
        refusal = detail.partition("FATAL:")[2].strip()
        if any(busy in refusal for busy in _BUSY_SERVER):
            return TransientFault(f"database unavailable: {refusal}")
        hint = next((hint for key, hint in _REFUSAL_HINTS.items() if key in refusal), "")
        return DatabaseError(f"[database] url: the server refused the connection: {refusal}"
                             + (f" ({hint})" if hint else ""))
    if "unable to open database file" in detail:
        return DatabaseError(f"[database] url: cannot open the SQLite file: {detail}")
    return TransientFault(f"database unavailable: {detail}")


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
    except OperationalError as error:
        raise connection_problem(error) from None
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
    try:
        with _schema_lock(engine):
            current = current_revision(engine)
            if current == head_revision():
                return
            if current is None and not inspect(engine).get_table_names():
                upgrade(engine)
                return
    except OperationalError as error:
        raise connection_problem(error) from None
    raise DatabaseError(
        f"database schema is at revision {current or 'none'}, this version needs {head_revision()}: "
        "run `dermwatch db upgrade` (back up the database first)"
    )
