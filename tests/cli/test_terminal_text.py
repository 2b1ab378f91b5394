"""What echoes user text on the terminal (errors, notes, the dry-run table, preset lists) never
carries control characters: an escape sequence in a preset's name, description or a prompt
cannot clear the screen or set the title. Tile sizes and preset keys are checked at plan time."""

from __future__ import annotations

import json
import re

import pytest

from linfusion_cli.cli.console import terminal_safe

from ..cli_helpers import TINY_PRESET, write_preset

ESCAPES = "\x1b[2J\x1b]0;owned\x07\x9b31m\r"
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def test_terminal_safe_keeps_text_newlines_and_tabs():
    assert terminal_safe(f"a{ESCAPES}b\n\tc") == "a[2J]0;owned31mb\n\tc"


def test_preset_names_and_descriptions_reach_the_terminal_without_controls(cli, cli_env, tmp_path):
    folder = tmp_path / "config" / "presets"
    write_preset(folder / f"evil{ESCAPES}.yaml", TINY_PRESET.replace(
        "description: tiny test ladder", f"description: \"tiny{ESCAPES}\""))
    listed = cli("presets", "list")
    assert listed.code == 0, listed.err
    assert "evil" in listed.out and not CONTROL.search(listed.out)

    preset = str(write_preset(tmp_path / f"p{ESCAPES}.yaml"))
    dry = cli("generate", "a boat", "--preset", preset, "--res", "128", "--dry-run")
    assert dry.code == 0, dry.err
    assert "preset p[2J" in dry.out and not CONTROL.search(dry.out.replace("\n", ""))


def test_errors_and_notes_echo_prompts_and_names_without_controls(cli, tmp_path):
    missing = cli("generate", "a boat", "--preset", f"nope{ESCAPES}", "--dry-run")
    assert missing.code == 2 and len(missing.err_lines) == 1, missing.err
    assert "nope" in missing.err and not CONTROL.search(missing.err.rstrip("\n"))

    prompts = tmp_path / "p.txt"
    prompts.write_text(f"a boat{ESCAPES}\n")
    preset = str(write_preset(tmp_path / "tiny.yaml"))
    made = cli("batch", str(prompts), "--preset", preset, "--res", "64", "-o", "out/")
    assert made.code == 0, made.err
    assert "a boat[2J" in made.err and not CONTROL.search(made.err.replace("\n", ""))


@pytest.mark.parametrize("extra, words", [
    (["--vae-tile", "8"], "at least 64"),
    (["--vae-tile", "56"], "at least 64"),
    (["--res", "16384", "--vae-tile", "64"], "65536 tiles"),
])
def test_tiny_vae_tiles_are_refused_at_plan_time(cli, extra, words):
    r = cli("generate", "a boat", "--model", "demo", "--res", "256", *extra, "--dry-run")
    assert r.code == 2 and len(r.err_lines) == 1 and words in r.err, r.err


def test_a_tile_the_planner_can_use_passes(cli):
    r = cli("generate", "a boat", "--model", "demo", "--res", "256", "--vae-tile", "64", "--dry-run", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["vae_tile_px"] == 64


@pytest.mark.parametrize("memory, ok", [("128", False), ("64", True), ("8", False)])
def test_contradictory_vae_tile_keys_are_refused_at_load(cli, tmp_path, memory, ok):
    preset = write_preset(tmp_path / "both.yaml", TINY_PRESET + f"vae_tile_px: 64\nmemory:\n  vae_tile_px: {memory}\n")
    r = cli("generate", "a boat", "--preset", str(preset), "--res", "256", "--dry-run")
    if ok:
        assert r.code == 0, r.err
    else:
        assert r.code == 2 and len(r.err_lines) == 1 and "both.yaml" in r.err, r.err
        assert "keep one" in r.err or "at least 64" in r.err or "from 64" in r.err


def test_output_names_with_control_characters_are_refused(cli, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "output": "\\u001b[2Jx.png"}\n')
    preset = str(write_preset(tmp_path / "tiny.yaml"))
    for args in (["batch", str(prompts)], ["generate", "a boat", "-o", "\x1b]0;t\x07.png"]):
        r = cli(*args, "--preset", preset, "--res", "64", "--dry-run")
        assert r.code == 2 and len(r.err_lines) == 1 and "control characters" in r.err, r.err
        assert not CONTROL.search(r.err.rstrip("\n"))
