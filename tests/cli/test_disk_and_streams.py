"""Writes that fail (a full disk, a broken encoder, a full or closed stdout) and the free-space preflight."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
from PIL import Image

from ..cli_helpers import DEMO, files_under, no_load, one_error


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_disk_full_is_one_line_exit_1_and_nothing_left(cli, tmp_path, monkeypatch, fmt):
    from linfusion_cli.io import images

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(images.os, "fsync", full)
    result = cli("generate", "x", *DEMO, "--res", "64", "-q", "-o", f"out/x.{fmt}")
    one_error(result, "x." + fmt, "no space left", code=1)
    assert files_under(tmp_path / "out") == []


def test_tiff_encoder_failure_is_one_line(cli, tmp_path, monkeypatch):
    real = Image.Image.save

    def broken(self, fp, format=None, **kwargs):
        if format == "TIFF":
            raise RuntimeError("tiff codec initialization failed")
        return real(self, fp, format, **kwargs)

    monkeypatch.setattr(Image.Image, "save", broken)
    result = cli("generate", "x", *DEMO, "--res", "64", "-q", "-o", "out/x.tiff")
    one_error(result, "x.tiff", "disk full", code=1)
    assert files_under(tmp_path / "out") == []


@pytest.mark.slow
def test_full_stdout_is_one_line_exit_1(cli_env, tmp_path):
    with open("/dev/full", "wb") as full:
        proc = __import__("subprocess").run(
            ["linfusion", "generate", "x", "--model", "demo", "--steps", "2", "--res", "64", "-q", "-o", "-"],
            env=cli_env, stdout=full, stderr=-1, stdin=-3, timeout=600)
    lines = [line for line in proc.stderr.decode().splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and "stdout" in lines[0] and "space" in lines[0]


def test_preflight_refuses_a_disk_too_small(cli, tmp_path, monkeypatch):
    from linfusion_cli.io import targets

    no_load(monkeypatch)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(targets.shutil, "disk_usage", lambda p: usage._replace(free=3 << 20))
    result = cli("generate", "x", *DEMO, "--res", "1024", "--strengths", "0.5", "--format", "tiff",
                 "-o", "out/")
    one_error(result, "MiB free", "1024x1024 tiff", code=1)
    assert files_under(tmp_path / "out") == []
    # JPEG at 1024 px fits the same room (bounded at half the raw size + 1 MiB)
    assert targets.image_bound(1024, 1024, "jpg") < (3 << 20) < targets.image_bound(1024, 1024, "tiff")


def test_preflight_counts_every_image_of_a_batch(cli, tmp_path, monkeypatch):
    from linfusion_cli.io import targets

    no_load(monkeypatch)
    one = targets.image_bound(512, 512, "png")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(targets.shutil, "disk_usage", lambda p: usage._replace(free=3 * one))
    ok = cli("batch", "-", *DEMO, "--res", "512", "-o", "out", "--dry-run", stdin="a\nb\nc\n")
    assert ok.code == 0, ok.err
    result = cli("batch", "-", *DEMO, "--res", "512", "-o", "out", stdin="a\nb\nc\nd\n")
    one_error(result, "MiB free", "4 images", code=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_closed_stdin_and_stdout_are_one_line(cli_env, tmp_path):
    import subprocess
    import sys

    script = ("import os, sys; os.close(0); os.close(1); "
              "from linfusion_cli.cli.app import run; sys.exit(run(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", script, "generate", *DEMO, "--res", "64", "-o", "-"],
                          env=cli_env, stderr=subprocess.PIPE, timeout=600)
    lines = [line for line in proc.stderr.decode().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "stdin" in lines[0]
    proc = subprocess.run([sys.executable, "-c", script, "generate", "x", *DEMO, "--res", "64", "-q", "-o", "-"],
                          env=cli_env, stderr=subprocess.PIPE, timeout=600)
    lines = [line for line in proc.stderr.decode().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "stdout is closed" in lines[0]


def test_error_goes_to_the_launchers_error_file(cli, tmp_path, monkeypatch):
    """Under torchrun (TORCHELASTIC_ERROR_FILE set) the one error line is what its report shows."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    r = cli("batch", "missing.txt", "--model", "demo")
    assert r.code == 2 and len(r.err_lines) == 1
    data = json.loads(error_file.read_text())
    assert data["message"] == r.err_lines[0] and "missing.txt" in data["message"]
    assert isinstance(data["timestamp"], int)
