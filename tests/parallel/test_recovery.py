"""Out of memory on one rank of a band-parallel run (torchrun, 2 CPU processes, gloo): the ranks
agree at the phase's entry, so both retry the stage with the same new plan and the image is the
single-process one; where no plan is left, both stop with the same one line, and none hangs.
NaN/inf in one rank's VAE tiles: both ranks retry the VAE in float32."""

from __future__ import annotations

import numpy as np
import pytest

from linfusion_cli.io.metadata import read_metadata

from .helpers import run_ranks
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


def _nan_run(folder: str, rank: int | None, size: int, out: str) -> None:
    """The tiny ladder with a bf16 VAE whose tiles turn NaN in stage 2 (on `rank` only, or alone
    when rank is None) until the VAE is float32; writes the image and the record."""
    import json

    import torch

    from linfusion_cli import parallel
    from linfusion_cli.models.loading import load_model
    from linfusion_cli.pipeline import StageStarted, finite, run_plan
    from linfusion_cli.planning.memory.planner import MemoryPlan
    from linfusion_cli.planning.plan import build_plan

    model = load_model(folder, linfusion="fresh", family="sd15", dtype="bf16")
    finite.widen(model, "unet")  # the UNet in float32, the VAE in bf16
    armed = []

    def poison(m, i, o):
        return o * float("nan") if armed and m.weight.dtype != torch.float32 else o
    if rank in (None, 1):
        model.pipe.vae.decoder.conv_out.register_forward_hook(poison)
    plan = build_plan(prompt="a boat", width=128, height=128, native=64, strengths=[0.5], steps=2,
                      guidance=5.0, seed=3, scheduler="default", model=folder, family="sd15",
                      linfusion="fresh", vae_tile_px=64)
    plan = plan.with_memory([MemoryPlan(attn_chunk=64, inplace=True, vae_tile_px=64)] * 2)
    arm = lambda e: isinstance(e, StageStarted) and e.stage == 1 and armed.append(1)  # noqa: E731
    if rank is None:
        image, record = run_plan(plan, model, on_event=arm)
    else:
        with parallel.band_parallel(rank, size, "cpu") as group:
            image, record = run_plan(plan, model, on_event=arm, previews=False, group=group)
    np.save(f"{out}/{'single' if rank is None else rank}.npy", image)
    with open(f"{out}/{'single' if rank is None else rank}.json", "w") as f:
        json.dump([s["attempts"] for s in record["stages"]], f)


def _nan_worker(rank: int, size: int, folder: str, out: str) -> None:
    _nan_run(folder, rank, size, out)


def test_nan_in_rank_1s_vae_tiles_makes_both_ranks_retry_it_in_float32(tiny_pipeline_dirs, tmp_path):
    import json

    folder = str(tiny_pipeline_dirs["sd15"])
    _nan_run(folder, None, 1, str(tmp_path))
    run_ranks(2, _nan_worker, folder, str(tmp_path))
    attempts = {k: json.loads((tmp_path / f"{k}.json").read_text()) for k in ("single", 0, 1)}
    assert attempts[0] == attempts[1]  # one decision on both ranks
    assert [(a["phase"], a["reason"], a["retry"]["dtype"]) for a in attempts[0][1]] == \
        [("vae", "NaN/inf from the VAE on rank 1", "fp32")]
    assert attempts[0][0] == [] and [a["reason"] for a in attempts["single"][1]] == ["NaN/inf from the VAE"]
    single = np.load(tmp_path / "single.npy").astype(int)
    for r in (0, 1):
        assert np.abs(np.load(tmp_path / f"{r}.npy").astype(int) - single).max() <= 1
