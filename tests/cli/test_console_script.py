"""The console script and `python -m` as a shell runs them: help, stdin to stdout, pipelines."""

from __future__ import annotations

import json
import os
import sys

import pytest
from PIL import Image

from linfusion_cli.io.metadata import read_metadata

from ..cli_helpers import (
    DEMO,
    PNG_MAGIC,
    files_under,
    parameters_fields,
    run_subprocess,
    write_preset,
)


def test_typer_cli_runner_help_and_presets():
    from typer.testing import CliRunner

    from linfusion_cli.cli.app import app

    runner = CliRunner()
    listed = runner.invoke(app, ["presets", "list"])
    assert listed.exit_code == 0 and "sdxl-lowmem" in listed.output
    helped = runner.invoke(app, ["generate", "--help"])
    assert helped.exit_code == 0
    for option in ("--res", "--aspect", "--save-stages", "--dry-run", "--strengths", "--vae-tile"):
        assert option in helped.output


@pytest.mark.slow
def test_python_m_stdin_prompt_to_stdout_png_quiet(cli_env, tmp_path):
    proc = run_subprocess([sys.executable, "-m", "linfusion_cli", "generate", "-", *DEMO, "--res", "64",
                           "--seed", "1", "-o", "-", "-q"], cli_env, input="a lighthouse\n")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b"", "-q leaves stderr empty"
    assert proc.stdout.startswith(PNG_MAGIC)
    (tmp_path / "x.png").write_bytes(proc.stdout)
    with Image.open(tmp_path / "x.png") as im:
        im.load()
        assert im.size == (64, 64)
    record = read_metadata(tmp_path / "x.png")["record"]
    assert record["prompt"] == "a lighthouse" and record["seed"] == 1
    assert files_under(tmp_path) == [tmp_path / "x.png"], "-o - writes no file"


@pytest.mark.slow
def test_console_script_presets_and_usage_error(cli_env, tmp_path):
    write_preset(tmp_path / "config" / "presets" / "mine.yaml")
    proc = run_subprocess(["linfusion", "presets", "list"], cli_env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert any(line.startswith("mine ") for line in proc.stdout.decode().splitlines())
    bad = run_subprocess(["linfusion", "generate", "x", "--no-such-option"], cli_env)
    assert bad.returncode == 2 and bad.stdout == b""
    lines = [line for line in bad.stderr.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and "--no-such-option" in lines[0]


@pytest.mark.slow
def test_shell_pipeline_batch_json(cli_env, tmp_path):
    out = tmp_path / "batch dir"
    pipeline = f"printf 'a\\nb\\n' | linfusion batch - --model demo --res 256 --steps 2 --seed 40 --json -o '{out}'"
    proc = run_subprocess(["bash", "-c", pipeline], cli_env)
    assert proc.returncode == 0, proc.stderr.decode()
    rows = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert len(rows) == 2
    for row, prompt, seed in zip(rows, ["a", "b"], [40, 41]):
        path = tmp_path / row["path"] if not os.path.isabs(row["path"]) else row["path"]
        assert os.path.isfile(path) and os.path.dirname(path) == str(out)
        meta = read_metadata(path)
        record = meta["record"]
        for key, value in (("seed", seed), ("width", 256), ("height", 256), ("prompt", prompt)):
            assert row[key] == record[key] == value
        assert meta["parameters"].splitlines()[0] == prompt
        fields = parameters_fields(meta["parameters"])
        assert (fields["Seed"], fields["Size"]) == (str(seed), "256x256")
