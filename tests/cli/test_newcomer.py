"""The newcomer's path (issue 24): refusals name what works, the version, printed paths."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ..cli_helpers import write_preset


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _needed(line: str) -> str:
    return re.search(r"needs at least (\d+\.\d) GiB", line).group(1)


# ---------------------------------------------------------------- budget refusals: the whole run

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


# ---------------------------------------------------------------- download refusals

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


# ---------------------------------------------------------------- version

def test_version_prints_the_package_version(cli):
    from importlib import metadata

    r = cli("--version")
    assert r.code == 0 and r.out.strip() == f"linfusion {metadata.version('linfusion-cli')}"
    assert r.err == ""


# ---------------------------------------------------------------- printed paths: as given

@pytest.mark.parametrize("output", [None, "out/", "out/x.png", "ABS"])
def test_paths_are_printed_as_given(cli, tmp_path, output):
    """Without -o the bare file name (in the cwd); with -o, -o joined with the name, as written."""
    preset = write_preset(tmp_path / "tiny.yaml")
    args = ["generate", "a cat", "--preset", str(preset), "--res", "64", "--seed", "3", "-q"]
    if output == "ABS":
        output = str(tmp_path / "abs") + "/"
    if output is not None:
        args += ["-o", output]
    r = cli(*args)
    assert r.code == 0, r.err
    printed = r.out.strip()
    if output is None:
        assert "/" not in printed and Path(printed).is_file()
    elif output.endswith("/"):
        assert printed.startswith(output) and "/" not in printed[len(output):]
    else:
        assert printed == output
    assert (Path.cwd() / printed).is_file()
    j = cli(*args, "--json", "--overwrite")
    assert json.loads(j.out)["path"] == printed


def test_batch_paths_are_printed_as_given(cli, tmp_path):
    preset = write_preset(tmp_path / "tiny.yaml")
    (tmp_path / "p.txt").write_text('a cat\n{"prompt": "a dog", "output": "sub/dog.png"}\n')
    r = cli("batch", "p.txt", "--preset", str(preset), "--res", "64", "--seed", "3", "-q",
            "--name", "{slug}-{seed}.{ext}")
    assert r.code == 0, r.err
    assert r.out_lines == ["a-cat-3.png", "sub/dog.png"]


# ---------------------------------------------------------------- torchrun's report

def test_error_goes_to_the_launchers_error_file(cli, tmp_path, monkeypatch):
    """Under torchrun (TORCHELASTIC_ERROR_FILE set) the one error line is what its report shows."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    r = cli("batch", "missing.txt", "--model", "demo")
    assert r.code == 2 and len(r.err_lines) == 1
    data = json.loads(error_file.read_text())
    assert data["message"] == r.err_lines[0] and "missing.txt" in data["message"]
    assert isinstance(data["timestamp"], int)
