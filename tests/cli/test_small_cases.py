"""Smaller cases: ~ expanded, duplicate preset keys, line breaks in names, dry-run JSON lines,
stale .part files, no empty folder on a failed load, read-only and rootless caches, inert hooks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..cli_helpers import DEMO, LADDER, one_error, write_jsonl, write_preset


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_smaller_cases(cli, tmp_path, monkeypatch):
    import socket

    from linfusion_cli.io.metadata import read_metadata
    from linfusion_cli.models import loading
    from linfusion_cli import testhooks

    # ~ is expanded for every path (a preset file, -o)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_preset(tmp_path / "home" / "p.yaml", LADDER)
    result = cli("generate", "x", "--preset", "~/p.yaml", "--res", "128", "-o", "~/out/", "--dry-run", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["path"].startswith(str(tmp_path / "home" / "out"))
    # duplicate preset keys; memory knobs bounded like the flags
    for text, needle in (("steps: 2\nsteps: 3\n", "given twice"), ("memory: {ff_chunk: 1000000000000}\n", "ff_chunk")):
        preset = write_preset(tmp_path / "bad.yaml", "model: demo\n" + text)
        one_error(cli("generate", "x", "--preset", str(preset), "--res", "64", "--dry-run"), needle)
    # a newline in an output name
    prompts = write_jsonl(tmp_path / "p.jsonl", {"prompt": "a", "output": "a\nb.png"})
    one_error(cli("batch", str(prompts), *DEMO, "--res", "64", "-o", "out", "--dry-run"), "control characters")
    one_error(cli("generate", "x", *DEMO, "--res", "64", "-o", "out/a\nb.png", "--dry-run"), "control characters")
    # batch --dry-run --json lines carry index and path
    prompts = tmp_path / "two.txt"
    prompts.write_text("a\nb\n")
    rows = [json.loads(line) for line in cli("batch", str(prompts), *DEMO, "--res", "64", "-o", "out",
                                             "--dry-run", "--json").out_lines]
    assert [r["index"] for r in rows] == [0, 1] and all(r["path"].startswith("out") for r in rows)
    # the dtype has one name in the dry run and in the record; a stale .part file is cleaned
    host = socket.gethostname().replace(".", "_")
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / f".x.png.{host}-{_dead_pid()}.abcd1234.part"
    stale.write_bytes(b"half an image")
    planned = json.loads(cli("generate", "x", *DEMO, "--res", "64", "--dry-run", "--json").out)
    made = cli("generate", "x", *DEMO, "--res", "64", "-o", "out/x.png", "-q")
    assert made.code == 0, made.err
    assert planned["dtype"] == read_metadata(tmp_path / "out" / "x.png")["record"]["dtype"] == "fp32"
    assert not stale.exists()
    # no empty output folder when loading fails (generate and batch)
    from linfusion_cli.cli import runs
    from linfusion_cli.errors import ModelNotFoundError

    def fail(*a, **k):
        raise ModelNotFoundError("no such model")

    monkeypatch.setattr(runs, "load", fail)
    one_error(cli("generate", "x", *DEMO, "--res", "64", "-o", "new1/x.png"), "no such model")
    one_error(cli("batch", str(prompts), *DEMO, "--res", "64", "-o", "new2/deeper"), "no such model")
    assert not (tmp_path / "new1").exists() and not (tmp_path / "new2").exists()
    # a read-only cache is said to be one, not a missing download
    monkeypatch.setenv("LINFUSION_CACHE", str(tmp_path / "ro-cache"))

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro-cache"))

    monkeypatch.setattr("linfusion_cli.models.tiny.save_tiny_pipeline", read_only)
    with pytest.raises(Exception) as info:
        loading.demo_folder("demo")
    assert "cannot build the demo model" in str(info.value) and "Permission denied" in str(info.value)
    # an empty HOME does not put the cache at the root
    monkeypatch.delenv("LINFUSION_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "")
    assert loading.cache_dir().is_absolute() and loading.cache_dir() != Path("/.cache/linfusion")
    # the test hook does nothing without the second, test-only variable
    monkeypatch.setenv(testhooks.AFTER_IMAGES, "*:1")
    monkeypatch.delenv(testhooks.ENABLE, raising=False)
    testhooks.after_images(0, 1)  # would exit the process if honoured
    # free-space refusals show two different numbers
    from linfusion_cli.io import targets

    need = targets.image_bound(64, 64, "png")
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(targets.shutil, "disk_usage", lambda p: usage(1, 1, need - 700))
    with pytest.raises(Exception) as info:
        targets.check_free_space(None, tmp_path / "x.png", "png", need=need, what="x")
    have, want = str(info.value).split(" free")[0].split("has ")[1], str(info.value).split("up to ")[1].split(" (")[0]
    assert have != want, str(info.value)
