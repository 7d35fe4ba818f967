"""What every ``tally`` command shares: the console for messages and loading the settings."""

from __future__ import annotations

import typer
from rich.console import Console

from pipeline.settings import Settings, SettingsError, load_settings

console = Console(stderr=True)


def settings_or_exit() -> Settings:
    """The settings, or exit 2 listing every problem (a bad setting stops start-up: pipeline/settings.py)."""
    try:
        return load_settings()
    except SettingsError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
