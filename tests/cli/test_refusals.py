"""Refusals name what works: the budget of the whole run, host memory, the download command
the installed hub has; the version."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _needed(line: str) -> str:
    return re.search(r"needs at least (\d+\.\d) GiB", line).group(1)


def test_gpu_refusal_names_the_budget_of_the_whole_run(cli, no_cuda):
    """--max-vram 10 fits stage 5 but not stage 6: the refusal names stage 6's figure at once,
    and that figure is a budget the whole run fits."""
    r = cli("generate", "x", "--res", "16384", "--max-vram", "10", "--dry-run")
    assert r.code == 2 and len(r.err_lines) == 1, r.err
    line = r.err_lines[0]
    assert "of GPU memory" in line and "stage 6 of 6" in line and "--max-vram 10 is too small" in line
    needed = _needed(line)
    assert f"--dry-run --max-vram {needed}" in line
    assert cli("generate", "x", "--res", "16384", "--max-vram", needed, "--dry-run").code == 0
    below = f"{float(needed) - 0.1:.1f}"
    assert cli("generate", "x", "--res", "16384", "--max-vram", below, "--dry-run").code == 2


def test_several_short_stages_give_one_figure(cli, no_cuda):
    r = cli("generate", "x", "--res", "16384", "--max-vram", "4", "--dry-run")
    assert r.code == 2 and len(r.err_lines) == 1
    assert "stage 6 of 6" in r.err and "stages do not fit" in r.err
    assert cli("generate", "x", "--res", "16384", "--max-vram", _needed(r.err), "--dry-run").code == 0


def test_cpu_refusal_says_host_memory_and_what_a_gpu_needs(cli, no_cuda):
    """A run (not a dry run) without a GPU: host memory, and the CUDA figure with the way to see it."""
    r = cli("generate", "x", "--res", "32768", "--max-vram", "40")
    assert r.code == 2 and len(r.err_lines) == 1, r.err
    line = r.err_lines[0]
    assert "of host memory (running on the CPU)" in line and "--max-vram 40 is too small" in line
    assert "expects a CUDA GPU" in line
    gpu = re.search(r"there this run needs (\d+\.\d) GiB", line).group(1)
    assert f"`--dry-run --max-vram {gpu}` shows its plan" in line
    assert cli("generate", "x", "--res", "16384", "--max-vram", gpu, "--dry-run").code == 0
    assert "loading" not in r.err  # refused before any model


@pytest.mark.parametrize("scripts,start", [({"hf", "huggingface-cli"}, "hf download a/b"),
                                           ({"huggingface-cli"}, "huggingface-cli download a/b"),
                                           (set(), "python -c")])
def test_download_command_is_one_the_installed_hub_has(monkeypatch, scripts, start):
    from linfusion_cli import hub

    monkeypatch.setattr(hub, "hub_commands", lambda: scripts)
    assert hub.download_command("a/b").startswith(start)
    with_include = hub.download_command("a/b", ("*.json", "*.txt"))
    if scripts:
        assert with_include.endswith("--include '*.json' '*.txt'")
    else:  # the Python call is valid Python naming the same patterns
        code = with_include.split('"')[1]
        compile(code, "<hint>", "exec")
        assert "snapshot_download('a/b', allow_patterns=['*.json', '*.txt'])" in code


def test_download_command_exists_in_this_environment():
    import shutil
    import sys

    from linfusion_cli.hub import download_command

    word = download_command("a/b").split()[0]
    assert word == "python" or shutil.which(word, path=str(Path(sys.executable).parent)), word


def test_missing_model_offline_names_the_installed_command(cli):
    from linfusion_cli.hub import download_command

    r = cli("generate", "x", "--model", "someone/not-cached-model", "--res", "64", "--steps", "1",
            "-o", "x.png", "--device", "cpu")
    assert r.code != 0 and len(r.err_lines) == 2, r.err  # "loading ..." then the error
    assert f"`{download_command('someone/not-cached-model')}`" in r.err_lines[-1]


def test_version_prints_the_package_version(cli):
    from importlib import metadata

    r = cli("--version")
    assert r.code == 0 and r.out.strip() == f"linfusion {metadata.version('linfusion-cli')}"
    assert r.err == ""
