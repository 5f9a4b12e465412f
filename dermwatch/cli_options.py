"""Options shared by every command module of the `dermwatch` CLI."""

from __future__ import annotations

from pathlib import Path

import click

config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    envvar="DERMWATCH_CONFIG", help="config.toml to read (default: $DERMWATCH_CONFIG, then ./config.toml).",
)
