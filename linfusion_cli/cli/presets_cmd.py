"""`linfusion presets list|show NAME`: bundled and user presets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import PresetError
from .console import terminal_safe
from ..planning.presets import available_presets, bundled_presets, load_preset, user_preset_dir

app = typer.Typer(no_args_is_help=True, help="List and show presets (bundled and user).")


@app.command("list")
def list_presets() -> None:
    """Every preset with its description; user presets live in the config directory."""
    for name, source in available_presets().items():
        where = "" if source.startswith("bundled:") else f"  [{source}]"
        try:
            description = load_preset(name).description
        except PresetError as exc:  # one broken user file must not hide the others
            description = f"(unusable: {exc})"
        print(terminal_safe(f"{name:<14} {description}{where}"))


@app.command("show")
def show(name: Annotated[str, typer.Argument(help="Preset name or YAML file.")]) -> None:
    """Print a preset's YAML (validated first)."""
    preset = load_preset(name)
    if preset.source.startswith("bundled:"):
        print(bundled_presets()[preset.name], end="")
    else:
        print(terminal_safe(Path(preset.source).read_text()), end="")


@app.command("path")
def path() -> None:
    """Where user presets are read from."""
    print(user_preset_dir())
