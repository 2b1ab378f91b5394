"""`linfusion batch` over 2 CPU processes (gloo): torchrun --standalone, or the launcher's env by hand.

The images must be the single-process ones pixel for pixel. torchrun gives each process
OMP_NUM_THREADS=1, and a CPU result depends on the thread count in its last bit, so the
single-process reference runs with OMP_NUM_THREADS=1 too (the split itself changes nothing).
Failures are made with a test hook (LINFUSION_TEST_AFTER_IMAGES): a rank dies, or holds for a
signal, right after a given finished image, so every test waits on events, never on the clock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from linfusion_cli.parallel.world import World, from_env
from linfusion_cli.testhooks import AFTER_IMAGES as ENV_TEST_HOOK
from linfusion_cli.errors import InputError
from linfusion_cli.io.manifest import MANIFEST_NAME

from ..cli_helpers import ROOT, files_under, pixels, run_subprocess

pytestmark = pytest.mark.slow  # several processes each: minutes, not seconds


TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
README_MARKER = "<!-- the torchrun line below is run by tests/parallel/test_world.py -->"


def readme_torchrun_line() -> str:
    text = (ROOT / "README.md").read_text()
    assert README_MARKER in text, "README.md lost its tested torchrun line"
    block = re.search(r"```(?:sh|bash)?\n(.*?)```", text[text.index(README_MARKER):], re.DOTALL)
    lines = [ln.strip() for ln in block.group(1).splitlines() if ln.strip().startswith("torchrun ")]
    assert len(lines) == 1, lines
    return lines[0]


def torchrun(env, nproc: int, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(env, OMP_NUM_THREADS="1", **(extra_env or {}))
    return run_subprocess([TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), "-m", "linfusion_cli",
                           "batch", *args], env)


def single(env, *args: str) -> subprocess.CompletedProcess:
    return run_subprocess([sys.executable, "-m", "linfusion_cli", "batch", *args],
                          dict(env, OMP_NUM_THREADS="1"))


def json_lines(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.decode().splitlines() if line.strip()]


def manifest_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / MANIFEST_NAME).read_text().splitlines()]


def stamps(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("*.png")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_by_hand(env, size: int, *args: str, extra_env: dict | None = None) -> list[subprocess.Popen]:
    """What torchrun does, without its agent: one process per rank with the group in the env."""
    port = str(free_port())
    procs = []
    for rank in range(size):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size),
                        LOCAL_WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                        OMP_NUM_THREADS="1", **(extra_env or {}))
        procs.append(subprocess.Popen([sys.executable, "-m", "linfusion_cli", "batch", *args], env=rank_env,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


# ---------------------------------------------------------------- library


def test_world_from_env_and_shares():
    world = from_env({"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (world.rank, world.size, world.local_rank, world.distributed) == (1, 3, 1, True)
    assert [i for i in range(8) if world.owns(i)] == [1, 4, 7]
    alone = from_env({})
    assert (alone.rank, alone.size, alone.distributed) == (0, 1, False)
    assert all(alone.owns(i) for i in range(5))
    assert World(rank=1, size=2).device("cpu") == "cpu"  # an explicit device is kept
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "two"}, {"RANK": "1", "WORLD_SIZE": "2"}):
        with pytest.raises(InputError):
            from_env(bad)


def test_a_rank_takes_its_local_rank_modulo_the_visible_gpus(monkeypatch):
    """Forced on the CPU: 4 processes on a machine whose launcher shows each 1 (or 2) GPUs."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert World(rank=3, size=4, local_rank=3).device("cuda") == "cuda:0"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert World(rank=3, size=4, local_rank=3).device(None) == "cuda:1"
    with pytest.raises(InputError, match="names one GPU"):
        World(rank=1, size=2, local_rank=1).device("cuda:0")
    assert World(rank=0, size=1).device("cuda:0") == "cuda:0"  # one process: as asked


def test_bf16_is_native_only_from_compute_capability_8(monkeypatch):
    import torch

    from linfusion_cli.models.loading import native_bf16

    for capability, native in (((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert native_bf16(torch.device("cuda", 0)) is native
    assert not native_bf16(torch.device("cpu"))


# ---------------------------------------------------------------- torchrun


def test_readme_torchrun_line_matches_one_process_pixel_for_pixel(cli_env, tmp_path):
    """The README's line as written: one JSON line per image in total, single-process images."""
    (tmp_path / "prompts.txt").write_text(
        "a red boat\n"
        '{"prompt": "a green field", "seed": 5, "width": 128, "height": 64}\n'
        "a blue sky\n--prompt \"the moon\" --steps 3\nthe sun\n")
    line = readme_torchrun_line()
    assert line == ("torchrun --standalone --nproc-per-node 2 -m linfusion_cli batch prompts.txt "
                    "--model demo --res 128 --steps 2 --seed 9 --json -o out/")
    proc = run_subprocess(["bash", "-c", line], dict(cli_env, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    rows = json_lines(proc)
    assert sorted(row["index"] for row in rows) == [0, 1, 2, 3, 4], "one line per image, in total"

    ref = single(cli_env, "prompts.txt", "--model", "demo", "--res", "128", "--steps", "2", "--seed", "9",
                 "--json", "-o", "ref/")
    assert ref.returncode == 0, ref.stderr.decode()[-3000:]
    ref_rows = {row["index"]: row for row in json_lines(ref)}
    for row in rows:
        want = ref_rows[row["index"]]
        assert (row["seed"], row["width"], row["height"]) == (want["seed"], want["width"], want["height"])
        assert Path(row["path"]).name == Path(want["path"]).name
        assert np.array_equal(pixels(tmp_path / row["path"]), pixels(tmp_path / want["path"])), row["path"]
    assert [row["seed"] for row in sorted(rows, key=lambda r: r["index"])] == [9, 5, 11, 12, 13]
    records = manifest_rows(tmp_path / "out")
    assert sorted(r["index"] for r in records) == [0, 1, 2, 3, 4]
    assert {r["world_size"] for r in records} == {2}
    assert {r["index"]: r["rank"] for r in records} == {0: 0, 1: 1, 2: 0, 3: 1, 4: 0}

    # accelerate launch starts the same kind of group (its --multi_gpu path runs on CPUs too)
    words = line.split()
    args = words[words.index("-m"):-1] + ["acc/"]
    accelerate = run_subprocess(
        [shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate", "launch",
         "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", *args], dict(cli_env, OMP_NUM_THREADS="1"))
    assert accelerate.returncode == 0, accelerate.stderr.decode()[-3000:]
    acc_rows = json_lines(accelerate)
    assert sorted(row["index"] for row in acc_rows) == [0, 1, 2, 3, 4]
    for row in acc_rows:
        want = ref_rows[row["index"]]
        assert np.array_equal(pixels(tmp_path / row["path"]), pixels(tmp_path / want["path"])), row["path"]


def test_killed_rank_then_resume_on_other_world_sizes_redoes_nothing(cli_env, tmp_path):
    """Rank 1 dies after its first image; --resume on 3 processes, then on 1, finishes the file."""
    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(8)))
    args = ("p.txt", "--model", "demo", "--res", "64", "--steps", "2", "--json", "-o", "out/")  # no --seed
    out = tmp_path / "out"
    first = torchrun(cli_env, 2, *args, extra_env={ENV_TEST_HOOK: "1:1", "LINFUSION_TEST_HOOKS": "1"})
    assert first.returncode != 0, "the launcher reports the dead rank"
    done = {r["index"] for r in manifest_rows(out)}
    assert 1 in done and not {3, 5, 7} & done, "rank 1 finished one image, then died"
    assert {p.name for p in out.glob("*.png")} == {f"{i:04d}-prompt-{i}.png" for i in done}
    assert not [p for p in files_under(out) if p.name.endswith(".part")]
    base = {r["base_seed"] for r in manifest_rows(out)}
    assert len(base) == 1
    before = stamps(out)

    again = torchrun(cli_env, 3, *args, "--resume")
    assert again.returncode == 0, again.stderr.decode()[-3000:]
    rows = json_lines(again)
    assert sorted(row["index"] for row in rows) == list(range(8))
    assert {row["index"] for row in rows if row.get("skipped")} == done
    assert stamps(out).items() >= before.items(), "finished images are not redone"
    records = manifest_rows(out)
    assert sorted(r["index"] for r in records) == list(range(8)), "each entry recorded once"
    assert {r["base_seed"] for r in records} == base, "resume without --seed reuses the drawn seeds"

    # the same images as one uninterrupted process with the seed the first run drew
    ref = single(cli_env, *args[:-1], "ref/", "--seed", str(base.pop()))
    assert ref.returncode == 0, ref.stderr.decode()[-3000:]
    for p in sorted(out.glob("*.png")):
        assert np.array_equal(pixels(p), pixels(tmp_path / "ref" / p.name)), p.name

    # one process now: all done, no model load, one skipped line per image
    last = single(cli_env, *args, "--resume")
    assert last.returncode == 0, last.stderr.decode()
    assert sorted(row["index"] for row in json_lines(last) if row["skipped"]) == list(range(8))
    assert "loading" not in last.stderr.decode()


# ---------------------------------------------------------------- launched by hand (exit codes)


def test_bad_file_fails_every_rank_with_one_line(cli_env, tmp_path):
    (tmp_path / "p.txt").write_text('a cat\na dog\n{"prompt": "x", "steps": -3}\n')
    procs = launch_by_hand(cli_env, 2, "p.txt", "--model", "demo", "--res", "64", "-o", "out/")
    results = [(p.wait(), p.stdout.read(), p.stderr.read().decode()) for p in procs]
    assert [code for code, _, _ in results] == [2, 2]
    assert [out for _, out, _ in results] == [b"", b""]
    lines = [line for _, _, err in results for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: p.txt:3: "), lines
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("signum,code,line", [(signal.SIGINT, 130, "error: interrupted"),
                                               (signal.SIGTERM, 143, "error: interrupted (SIGTERM)")])
def test_ctrl_c_stops_every_rank_cleanly(cli_env, tmp_path, signum, code, line):
    """Both ranks hold after their first image; one signal each: 128 + signum, nothing half-written."""
    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(6)))
    procs = launch_by_hand(cli_env, 2, "p.txt", "--model", "demo", "--res", "64", "--steps", "2",
                           "--json", "-o", "out/", extra_env={ENV_TEST_HOOK: "*:1:hold", "LINFUSION_TEST_HOOKS": "1"})
    firsts = [json.loads(p.stdout.readline()) for p in procs]  # each rank finished one image
    assert [row["index"] for row in firsts] == [0, 1]
    for p in procs:
        p.send_signal(signum)
    results = [(p.wait(), p.stdout.read(), p.stderr.read().decode()) for p in procs]
    assert [rc for rc, _, _ in results] == [code, code]
    for _, out, err in results:
        assert out == b""
        assert [row for row in err.splitlines() if row.startswith("error:")] == [line]
    out = tmp_path / "out"
    assert sorted(p.name for p in files_under(out)) == ["0000-prompt-0.png", "0001-prompt-1.png", MANIFEST_NAME]
    assert sorted(r["index"] for r in manifest_rows(out)) == [0, 1]


def test_without_an_agent_a_dead_rank_does_not_stop_the_others(cli_env, tmp_path):
    """After the start-up agreement nothing crosses ranks: rank 0 finishes its share alone."""
    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(6)))
    procs = launch_by_hand(cli_env, 2, "p.txt", "--model", "demo", "--res", "64", "--steps", "2", "--seed", "2",
                           "--json", "-o", "out/", extra_env={ENV_TEST_HOOK: "1:1", "LINFUSION_TEST_HOOKS": "1"})
    results = [(p.wait(), p.stdout.read().decode()) for p in procs]
    assert [code for code, _ in results] == [0, 3]
    assert sorted(json.loads(line)["index"] for line in results[0][1].splitlines()) == [0, 2, 4]
    assert [json.loads(line)["index"] for line in results[1][1].splitlines()] == [1]
    assert sorted(r["index"] for r in manifest_rows(tmp_path / "out")) == [0, 1, 2, 4]


def test_ctrl_c_under_torchrun_stops_both_ranks_cleanly(cli_env, tmp_path):
    """SIGINT to the whole process group (a terminal's Ctrl-C) while both ranks are mid-file."""
    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(6)))
    env = dict(cli_env, OMP_NUM_THREADS="1", **{ENV_TEST_HOOK: "*:1:hold", "LINFUSION_TEST_HOOKS": "1"})
    proc = subprocess.Popen([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "linfusion_cli", "batch",
                             "p.txt", "--model", "demo", "--res", "64", "--steps", "2", "--json", "-o", "out/"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    firsts = sorted(json.loads(proc.stdout.readline())["index"] for _ in range(2))  # both ranks hold
    assert firsts == [0, 1]
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode != 0 and out == b""
    errors = [line for line in err.decode().splitlines() if line.startswith("error:")]
    assert errors == ["error: interrupted"], err.decode()[-3000:]  # rank 0 speaks for both
    folder = tmp_path / "out"
    assert sorted(p.name for p in files_under(folder)) == ["0000-prompt-0.png", "0001-prompt-1.png", MANIFEST_NAME]
