"""Out of memory on one rank of a band-parallel run (torchrun, 2 CPU processes, gloo): the ranks
agree at the phase's entry, so both retry the stage with the same new plan and the image is the
single-process one; where no plan is left, both stop with the same one line, and none hangs."""

from __future__ import annotations

import numpy as np
import pytest

from linfusion_cli.io.metadata import read_metadata

from .test_cli import HOOKS, _by_hand, _pixels, _single, _torchrun

pytestmark = pytest.mark.slow  # torchrun and by-hand ranks: processes

ARGS = ("generate", "a lighthouse", "--model", "demo", "--res", "128", "--steps", "3", "--seed", "7")


def test_out_of_memory_on_rank_1_makes_both_ranks_retry_and_gives_the_one_process_image(cli_env, tmp_path):
    one = _single(cli_env, *ARGS, "-o", tmp_path / "one.png")
    assert one.returncode == 0, one.stderr.decode()[-2000:]
    env = dict(cli_env, **HOOKS, LINFUSION_TEST_OOM="1:unet:2")  # rank 1's second UNet forward
    two = _torchrun(env, 2, *ARGS, "-o", tmp_path / "two.png")
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    stage = read_metadata(tmp_path / "two.png")["record"]["stages"][0]
    assert [(a["phase"], a["reason"]) for a in stage["attempts"]] == \
        [("unet", "out of memory in the unet on rank 1")]
    assert stage["memory"] == stage["attempts"][0]["retry"]["memory"] != stage["attempts"][0]["memory"]
    assert np.abs(_pixels(tmp_path / "one.png") - _pixels(tmp_path / "two.png")).max() <= 1


def test_out_of_memory_on_rank_1_at_every_attempt_stops_both_ranks_with_one_line(cli_env, tmp_path):
    """Without torchrun's agent (whose own report of a failed child is a traceback of its own)."""
    procs = _by_hand(cli_env, 2, *ARGS, "-q", "-o", tmp_path / "two.png",
                     extra_env={**HOOKS, "LINFUSION_TEST_OOM": "1:vae_decode:*"})
    lines = []
    for proc in procs:
        code, err = proc.wait(timeout=600), proc.stderr.read().decode()
        assert code == 1 and "Traceback" not in err, err[-3000:]
        assert len(err.splitlines()) == 1, err[-3000:]
        lines.append(err.strip())
    assert lines[0] == lines[1]  # the same line on every rank
    assert lines[0].startswith("error: stage 1 (128x128) ran out of device memory in the VAE decode")
    assert not (tmp_path / "two.png").exists()
    assert procs[0].stdout.read() == b""
