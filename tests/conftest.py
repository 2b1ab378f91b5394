"""Shared fixtures: tiny random models built from config dicts, saved and loaded back."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.register_assert_rewrite("tests.cli_helpers", "tests.model_helpers")

from .cli_helpers import Result, scripts_dir  # noqa: E402 (after the rewrite hook)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _quick_tier_starts_no_process(request, monkeypatch):
    """`-m "not slow"` is the quick tier: a test that starts a process (a CLI subprocess,
    torchrun, multiprocessing workers) must be marked slow, or it fails here and says so."""
    if request.node.get_closest_marker("slow"):
        return

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts a process: mark it @pytest.mark.slow")

    import multiprocessing.process
    import subprocess

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)


@pytest.fixture(scope="session")
def tiny_pipeline_dirs(tmp_path_factory):
    """The three tiny families saved with save_pretrained, built once per test session."""
    from linfusion_cli.models.tiny import FAMILIES, save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny_pipeline(root / family, family) for family in FAMILIES}


# ---------------------------------------------------------------- the CLI (in-process and subprocess)

@pytest.fixture(scope="session")
def cli_cache(tmp_path_factory) -> Path:
    """One demo-model cache for the whole session (the same folder from every test module)."""
    folder = tmp_path_factory.getbasetemp() / "linfusion-cache"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture
def cli_env(cli_cache, tmp_path, monkeypatch) -> dict:
    """cwd = a fresh tmp dir, shared cache, offline hub, an empty user config dir.

    Returns the environment for subprocesses (with the console script first on PATH).
    """
    config = tmp_path / "config"
    (config / "presets").mkdir(parents=True)
    monkeypatch.setenv("LINFUSION_CACHE", str(cli_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LINFUSION_CONFIG_DIR", str(config))
    monkeypatch.chdir(tmp_path)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(scripts_dir()), str(Path(sys.executable).parent),
                                   env.get("PATH", "")])
    env.pop("PYTHONWARNINGS", None)
    return env


@pytest.fixture
def cli(cli_env, capsys, monkeypatch):
    """Run `linfusion ARGS` in-process through `run(argv)`; returns a Result."""
    from linfusion_cli.cli.app import run

    def invoke(*args: str, stdin: str | None = None) -> Result:
        capsys.readouterr()  # drop anything printed before
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = run([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke


# ---------------------------------------------------------------- the full memory-knob grids

def pytest_addoption(parser):
    parser.addoption("--full-grid", action="store_true",
                     help="also run the whole memory-knob grids (tests/grids.py); CI does, once")


def pytest_collection_modifyitems(config, items):
    """Without --full-grid, the grids run as their pairwise covering sets."""
    if config.getoption("--full-grid"):
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("full_grid") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
