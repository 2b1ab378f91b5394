"""Launcher variables left over in a plain shell: LOCAL_WORLD_SIZE alone changes no plan; WORLD_SIZE
without the rest of a launcher's variables is one line at once, never a wait for peers."""

from __future__ import annotations

import json
import sys

import pytest

from linfusion_cli import hostmem
from linfusion_cli.parallel.world import from_env
from linfusion_cli.parallel.launch import processes_here, speaks
from linfusion_cli.errors import InputError

from ..cli_helpers import DEMO, run_subprocess, write_jsonl

GIB = 2 ** 30
PLAN = ("generate", "a lighthouse", "--model", "runwayml/stable-diffusion-v1-5", "--res", "16384",
        "--dry-run", "--max-vram", "12", "--device", "cuda", "--seed", "1", "--json")
LAUNCHER = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_a_leftover_local_world_size_changes_no_single_process_plan(cli, monkeypatch):
    """Host memory shared by LOCAL_WORLD_SIZE processes matters only when there are several."""
    monkeypatch.setattr(hostmem, "host_memory", lambda: hostmem.HostMemory(64 * GIB, 48 * GIB))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    alone = cli(*PLAN)
    assert alone.code == 0, alone.err
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    leftover = cli(*PLAN)
    assert leftover.code == 0 and json.loads(leftover.out) == json.loads(alone.out)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "eight")  # not even read
    assert cli(*PLAN).code == 0
    assert processes_here(1, {"LOCAL_WORLD_SIZE": "4"}) == 1
    assert processes_here(1, {**LAUNCHER, "LOCAL_WORLD_SIZE": "4"}) == 4  # a batch sharing out images
    assert processes_here(8, {"LOCAL_WORLD_SIZE": "2"}) == 2  # --world-size 8 --dry-run, 2 per machine


@pytest.mark.parametrize("given", [{"WORLD_SIZE": "2"}, {"WORLD_SIZE": "2", "RANK": "0"},
                                   {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}])
def test_a_leftover_world_size_is_one_line_before_anything_waits(cli, monkeypatch, given):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    r = cli(*PLAN)
    assert r.code == 2 and r.out == "" and len(r.err_lines) == 1, r.err
    assert "WORLD_SIZE=2 is set but" in r.err and "torchrun" in r.err
    missing = [n for n in ("RANK", "MASTER_ADDR", "MASTER_PORT") if n not in given]
    assert all(n in r.err_lines[0] for n in missing)
    with pytest.raises(InputError):
        from_env(given)
    assert from_env({**LAUNCHER, "RANK": "1"}).rank == 1


def test_under_torchrun_rank_0_alone_prints_what_every_rank_would():
    """An interruption or a group that did not start: one line from rank 0 under torchrun's agent;
    ranks started by hand each have their own stderr and each print it."""
    agent = {"TORCHELASTIC_RUN_ID": "abc"}
    assert speaks(0, agent) and not speaks(1, agent)
    assert speaks(0, {}) and speaks(1, {})


@pytest.mark.parametrize("env,code,needle", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, 2, "MASTER_ADDR"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "LINFUSION_START_TIMEOUT": "2"}, 1,
     "did not start within 2 s"),
], ids=["no-master", "no-peer"])
@pytest.mark.slow
def test_launcher_variables_left_behind_are_one_line(cli_env, tmp_path, env, code, needle):
    import socket

    with socket.socket() as s:  # a free port for the store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prompts = write_jsonl(tmp_path / "p.jsonl", {"prompt": "a"})
    proc = run_subprocess([sys.executable, "-m", "linfusion_cli", "batch", str(prompts), *DEMO, "--res", "64",
                           "-o", "out", "--dry-run"], dict(cli_env, MASTER_PORT=str(port), **env),
                          cwd=tmp_path, timeout=300)
    err = [line for line in proc.stderr.decode().splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr.decode()
    assert len(err) == 1 and needle in err[0] and "unexpected" not in err[0], err
