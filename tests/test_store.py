"""The schema: migrations build exactly the models, and go down and up again cleanly."""

from __future__ import annotations

import json
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from dermwatch.store.db import alembic_config, current_revision, head_revision, make_engine, upgrade
from dermwatch.store.models import Base


def test_migrations_build_exactly_the_models(database_url: str) -> None:
    engine = make_engine(database_url)
    upgrade(engine)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    assert current_revision(engine) == head_revision()


def test_downgrade_to_base_and_up_again(database_url: str) -> None:
    engine = make_engine(database_url)
    upgrade(engine)
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    upgrade(engine)
    assert {"images", "sightings", "predictions", "rejections", "alerts"} <= set(inspect(engine).get_table_names())


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/sub/c.db")
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 30000


def test_upgrading_to_0003_gives_each_image_sidecar_to_its_first_arrival(database_url: str) -> None:
    engine = make_engine(database_url)
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    command.upgrade(config, "0002")
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO images (id, sha256, original_name, sidecar, received_at, processed_at, bytes, format, "
            "width, height, archive_path, state) VALUES (1, 'a', 'x.jpg', '{\"patient_reference\": \"P-1\"}', "
            "'2026-01-01 10:00:00', '2026-01-01 10:00:01', 1, 'JPEG', 40, 40, '/a/x.jpg', 'classified')"))
        for sighting_id, claim in ((1, "first"), (2, "again")):
            connection.execute(text(
                "INSERT INTO sightings (id, image_id, claim, original_name, received_at) "
                f"VALUES ({sighting_id}, 1, '{claim}', 'x.jpg', '2026-01-01 10:00:0{sighting_id}')"))
    command.upgrade(config, "head")
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT claim, sidecar FROM sightings ORDER BY id")).all()
    assert [(claim, as_json(sidecar)) for claim, sidecar in rows] == [
        ("first", {"patient_reference": "P-1"}), ("again", None)]
    command.downgrade(config, "0002")
    with engine.connect() as connection:
        restored = connection.execute(text("SELECT sidecar FROM images")).scalar()
    assert as_json(restored) == {"patient_reference": "P-1"}


def as_json(value):
    """A JSON column read back with raw SQL: text from SQLite, already parsed from PostgreSQL."""
    return json.loads(value) if isinstance(value, str) else value
