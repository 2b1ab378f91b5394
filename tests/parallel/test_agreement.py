"""Ranks agree before and while they work: each checks rank 0's plan before loading (a rank told
something else stops every rank with one line, exit 2), a batch entry that fails on one rank only
fails on every rank and the next entry is made, and launcher variables left over in a plain shell
neither change a plan nor make a command wait deaf to signals."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import pytest

from ..cli_helpers import files_under, write_preset
from .test_world import TORCHRUN, free_port, manifest_rows

pytestmark = pytest.mark.slow  # several processes each


def _ranks(env, per_rank: list[list], cwds=None, extra_env=None) -> list[subprocess.CompletedProcess]:
    """Two ranks started by hand, each with its own arguments (and working folder), run to the end."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "linfusion_cli", *map(str, args)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(len(per_rank)),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
                                       **(extra_env[r] if extra_env else {})),
                              cwd=cwds[r] if cwds else None, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r, args in enumerate(per_rank)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), p.stdout.read(), p.stderr.read())
            for p in procs]


def _one_line_each(results, code: int) -> list[str]:
    """Every rank exited `code` with exactly one stderr line and nothing on stdout; the lines."""
    lines = []
    for r in results:
        err = r.stderr.decode().strip().splitlines()
        assert r.returncode == code and r.stdout == b"" and len(err) == 1, (r.returncode, err)
        lines.append(err[0])
    return lines


def test_a_rank_given_another_flag_or_preset_stops_every_rank_before_loading(cli_env, tmp_path):
    base = ["generate", "a lighthouse", "--model", "demo", "--res", "128", "--seed", "1", "-o", tmp_path / "x.png"]
    lines = _one_line_each(_ranks(cli_env, [base + ["--steps", "2"], base + ["--steps", "3"]]), 2)
    assert lines[0] == lines[1] and "rank 1 would make something else than rank 0" in lines[0]
    assert "steps: 2 on rank 0, 3 on rank 1" in lines[0], lines
    # a user preset of the same name, another copy on each rank (e.g. two machines' config folders)
    configs = []
    for r, strength in enumerate(("0.5", "0.75")):
        write_preset(tmp_path / f"config{r}" / "presets" / "tiny.yaml",
                     f"native: 64\nsteps: 4\nstrengths: [{strength}]\n")
        configs.append({"LINFUSION_CONFIG_DIR": str(tmp_path / f"config{r}")})
    args = base + ["--preset", "tiny"]
    lines = _one_line_each(_ranks(cli_env, [args, args], extra_env=configs), 2)
    assert "strength: 0.5 on rank 0, 0.75 on rank 1" in lines[0], lines
    assert not (tmp_path / "x.png").exists()


def test_other_copies_of_the_prompt_file_stop_a_batch_with_one_line(cli_env, tmp_path):
    for r, text in enumerate(("a red boat\na blue boat\n", "a red boat\na green boat\n")):
        (tmp_path / f"m{r}").mkdir()
        (tmp_path / f"m{r}" / "p.txt").write_text(text)
    for parallel in ("bands", "images"):
        args = ["batch", "p.txt", "--model", "demo", "--res", "64", "--seed", "2", "--parallel", parallel,
                "-o", tmp_path / "out/"]
        lines = _one_line_each(_ranks(cli_env, [args, args], cwds=[tmp_path / "m0", tmp_path / "m1"]), 2)
        assert 'entries[1].plan.prompt: "a blue boat" on rank 0, "a green boat" on rank 1' in lines[0], lines
        assert not files_under(tmp_path / "out")


@pytest.mark.parametrize("rank", [1, 0])
def test_an_entry_failing_on_rank_1_only_fails_on_both_and_the_next_is_made(cli_env, tmp_path, rank):
    """One rank's disk fills at the end of entry 0's first stage (the test hook): every rank
    reports entry 0 failed at that stage's end, entry 1 is made over both ranks, exit 1."""
    write_preset(tmp_path / "config" / "presets" / "tiny.yaml")
    (tmp_path / "p.txt").write_text("a red boat\na blue boat\n")
    env = dict(cli_env, OMP_NUM_THREADS="1", LINFUSION_TEST_HOOKS="1", LINFUSION_TEST_FAIL_STAGE=f"{rank}:1")
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "linfusion_cli", "batch",
                           "p.txt", "--model", "demo", "--preset", "tiny", "--res", "128", "--seed", "4",
                           "--parallel", "bands", "--json", "-o", "out/"],
                          env=env, cwd=tmp_path, capture_output=True, stdin=subprocess.DEVNULL, timeout=600)
    err = proc.stderr.decode()
    assert proc.returncode != 0, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("error:")]
    who = "rank 1: " if rank else ""
    assert ours == [f"error: p.txt:1: {who}OSError: [Errno 28] No space left on device"], err[-3000:]
    assert not [line for line in err.splitlines() if "File" in line and "linfusion_cli" in line]  # ranks: no traceback
    assert [json.loads(line)["index"] for line in proc.stdout.decode().splitlines()] == [1]
    assert [row["index"] for row in manifest_rows(tmp_path / "out")] == [1]
    assert (tmp_path / "out" / "0001-a-blue-boat.png").exists()
    assert not (tmp_path / "out" / "0000-a-red-boat.png").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_group_that_cannot_start_answers_signals_and_its_timeout(cli_env, tmp_path, signum):
    """WORLD_SIZE=2 with a launcher's variables but no second rank: rank 0 waits for it, yet a
    signal ends the wait at once (128 + signum, one line); with a short timeout, one line, exit 1."""
    port = free_port()
    env = dict(cli_env, WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               LINFUSION_START_TIMEOUT="600")
    args = [sys.executable, "-m", "linfusion_cli", "generate", "a boat", "--model", "demo", "--res", "64",
            "--dry-run"]
    proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while True:  # rank 0 listens for its peers: now it is waiting in the group's start
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            break
        except OSError:
            assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signum)
    code = proc.wait(timeout=60)  # well before the start-up wait of 600 s
    err = proc.stderr.read().decode().strip().splitlines()
    assert code == 128 + signum and len(err) == 1 and err[0].startswith("error: interrupted"), (code, err)
    if signum == signal.SIGTERM:
        short = subprocess.run(args, env=dict(env, MASTER_PORT=str(free_port()), LINFUSION_START_TIMEOUT="3"),
                               capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
        lines = short.stderr.decode().strip().splitlines()
        assert short.returncode == 1 and len(lines) == 1 and "did not start within 3 s" in lines[0], lines


def test_rank_0_decides_where_a_resume_starts(cli_env, tmp_path):
    """Rank 0's disk fills after stage 1 (its checkpoint is written); the resume runs each rank in
    its own folder, rank 1's empty: both start at stage 2 from rank 0's checkpoint, and the image
    is the uninterrupted one's."""
    from ..cli_helpers import pixels

    write_preset(tmp_path / "config" / "presets" / "tiny.yaml")
    for name in ("r0", "r1", "one"):
        (tmp_path / name).mkdir()
    args = ["generate", "a lighthouse", "--model", "demo", "--preset", "tiny", "--res", "128", "--seed", "5",
            "-o", "out.png"]
    cwds = [tmp_path / "r0", tmp_path / "r1"]
    hook = {"LINFUSION_TEST_HOOKS": "1", "LINFUSION_TEST_FAIL_STAGE": "0:1"}
    failed = _ranks(cli_env, [args, args], cwds=cwds, extra_env=[hook, hook])
    assert [r.returncode for r in failed] == [1, 1], failed[0].stderr.decode()[-2000:]
    assert [p.name for p in files_under(tmp_path / "r0")] != [] and files_under(tmp_path / "r1") == []
    resumed = _ranks(cli_env, [args + ["--resume"]] * 2, cwds=cwds)
    assert [r.returncode for r in resumed] == [0, 0], resumed[0].stderr.decode()[-2000:]
    assert "starts at stage 2 of 2" in resumed[0].stderr.decode()
    assert [p.name for p in files_under(tmp_path / "r0")] == ["out.png"] and files_under(tmp_path / "r1") == []
    one = subprocess.run([sys.executable, "-m", "linfusion_cli", *args], env=dict(cli_env, OMP_NUM_THREADS="1"),
                         cwd=tmp_path / "one", capture_output=True, stdin=subprocess.DEVNULL, timeout=600)
    assert one.returncode == 0, one.stderr.decode()[-2000:]
    assert abs(pixels(tmp_path / "r0" / "out.png").astype(int) - pixels(tmp_path / "one" / "out.png")).max() <= 1


def test_a_rank_that_fails_before_rank_0_shares_the_prompt_stops_both_at_once(cli_env, tmp_path):
    """upscale opens its image before rank 0 shares the prompt: rank 1, whose folder lacks it,
    fails there while rank 0 is at the next start-up step; both stop, one line (rank 0's)."""
    from PIL import Image

    for name in ("r0", "r1"):
        (tmp_path / name).mkdir()
    Image.new("RGB", (48, 48), (90, 120, 150)).save(tmp_path / "r0" / "in.png")
    args = ["upscale", "in.png", "a lighthouse", "--model", "demo", "--res", "96", "-o", "out.png"]
    results = _ranks(cli_env, [args, args], cwds=[tmp_path / "r0", tmp_path / "r1"])
    assert [r.returncode for r in results] == [2, 2], results[0].stderr.decode()[-2000:]
    lines = [r.stderr.decode().strip().splitlines() for r in results]
    assert len(lines[0]) == 1 and lines[0][0].startswith("error: rank 1: ") and "in.png" in lines[0][0], lines
    assert lines[1] == [] and results[0].stdout == results[1].stdout == b""
