"""config.toml: defaults that work, relative paths, and one clear error per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from dermwatch.config import DEFAULTS, ensure_folders, load_settings
from dermwatch.errors import ConfigError

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config.toml"


def test_shipped_config_toml_states_exactly_the_defaults(tmp_path: Path) -> None:
    copy = tmp_path / "config.toml"
    copy.write_text(REPO_CONFIG.read_text())
    shipped, defaults = load_settings(copy), load_settings(_empty(tmp_path))
    assert shipped == type(shipped)(**{**defaults.__dict__, "source": shipped.source})


def _empty(folder: Path) -> Path:
    path = folder / "empty.toml"
    path.write_text("")
    return path


def test_relative_paths_and_sqlite_file_resolve_against_the_config_folder(tmp_path: Path) -> None:
    settings = load_settings(_empty(tmp_path))
    assert settings.paths.intake == tmp_path / "var" / "intake"
    assert settings.paths.work == tmp_path / "var" / "state" / "work"
    assert settings.database_url == f"sqlite:///{tmp_path}/var/dermwatch.db"
    assert settings.model.path is None


def test_non_sqlite_url_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[database]\nurl = "postgresql+psycopg://derm:secret@db.clinic/derm"\n')
    assert load_settings(path).database_url == "postgresql+psycopg://derm:secret@db.clinic/derm"


def test_environment_variable_names_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "site.toml"
    path.write_text('[watcher]\npolling = true\n')
    monkeypatch.setenv("DERMWATCH_CONFIG", str(path))
    assert load_settings().watcher.polling is True


@pytest.mark.parametrize(
    "text, message",
    [
        ("[paths]\nintake = 3\n", "[paths] intake must be a str, got 3"),
        ("[watcher]\nsettle_secs = 1\n", "unknown key [watcher] settle_secs"),
        ("[web]\nport = 1\n", "unknown section [web]"),
        ("[model]\nthreads = 0\n", "[model] threads must be positive"),
        ("[reports]\ncpu_share = 0\n", "[reports] cpu_share must be positive"),
        ("[reports]\ncpu_share = 2\n", "[reports] cpu_share is a share of one core, at most 1"),
        ("[watcher]\npolling = \"yes\"\n", "[watcher] polling must be a bool"),
        ("[database]\nurl = \"not a url\"\n", "is not a SQLAlchemy database URL"),
        ("[paths\n", "is not valid TOML"),
        ("paths = 1\n", "[paths] must be a table"),
    ],
)
def test_mistakes_are_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as caught:
        load_settings(path)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_integer_is_accepted_where_seconds_are_a_float(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[watcher]\nsettle_seconds = 2\n")
    assert load_settings(path).watcher.settle_seconds == 2.0


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_folder_that_cannot_be_created_names_its_key(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    path = tmp_path / "c.toml"
    path.write_text('[paths]\nreports = "file/reports"\n')
    with pytest.raises(ConfigError, match=r"\[paths\] reports: cannot create"):
        ensure_folders(load_settings(path))


def test_every_default_section_is_documented_in_config_toml() -> None:
    text = REPO_CONFIG.read_text()
    for section, keys in DEFAULTS.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"\n{key} = " in text


def test_polling_gets_a_safe_settle_time_unless_one_is_set(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[watcher]\npolling = true\n")
    assert load_settings(config).watcher.settle_seconds == 5.0
    config.write_text("[watcher]\npolling = true\nsettle_seconds = 2\n")
    assert load_settings(config).watcher.settle_seconds == 2.0
    config.write_text("")
    assert load_settings(config).watcher.settle_seconds == 1.0


def test_python_and_build_requirements_agree_with_the_readme() -> None:
    import tomllib

    root = Path(__file__).parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["requires-python"] == ">=3.11"  # tomllib, used by config.py, is 3.11+
    assert project["build-system"]["requires"] == ["setuptools>=77"]  # license = "MIT" needs 77
    assert "Python 3.11 or newer" in (root / "README.md").read_text()
