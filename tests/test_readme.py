"""README.md's usage block runs as written: every command exits 0 (demo model, no downloads)."""

from __future__ import annotations

import re

import pytest

from .cli_helpers import ROOT, run_subprocess


MARKER = "<!-- the commands in this block are run by tests/test_readme.py -->"


def readme_commands() -> list[str]:
    """The shell lines of the fenced block right after the marker (comments and blanks dropped)."""
    text = (ROOT / "README.md").read_text()
    assert MARKER in text, "README.md lost its tested usage block"
    block = re.search(r"```(?:sh|bash|console)?\n(.*?)```", text[text.index(MARKER):], re.DOTALL)
    assert block, "no fenced block after the marker"
    lines = [line.strip() for line in block.group(1).splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert all(c.startswith(("linfusion ", "printf ", "echo ")) for c in commands), commands
    return commands


COMMANDS = readme_commands()


def test_readme_block_covers_every_command():
    words = {c.split("|")[-1].split()[1] for c in COMMANDS}
    assert {"generate", "upscale", "batch", "presets", "info"} <= words


@pytest.mark.slow
def test_readme_commands_run(cli_env, tmp_path):
    """In order (later lines read earlier outputs), from a fresh cwd, each exits 0."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    for command in COMMANDS:
        proc = run_subprocess(["bash", "-o", "pipefail", "-c", command], cli_env, cwd=cwd)
        assert proc.returncode == 0, f"{command}\n{proc.stderr.decode()[-2000:]}"
        if "--json" in command and "-o -" not in command:
            import json

            for line in proc.stdout.decode().splitlines():
                assert isinstance(json.loads(line), dict), line
    made = sorted(p.relative_to(cwd).as_posix() for p in cwd.rglob("*") if p.is_file())
    assert made, "the README's examples write images under out/"


@pytest.mark.parametrize("command", [c for c in COMMANDS if "--dry-run" in c])
def test_readme_dry_runs_download_nothing(cli_env, tmp_path, command):
    """The dry runs plan the real sd15 preset offline: no model files appear anywhere."""
    cli_env = dict(cli_env, HF_HOME=str(tmp_path / "hf"))
    proc = run_subprocess(["bash", "-c", command], cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "Lykon/dreamshaper-8" in proc.stdout.decode()
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))
