"""A stage planned again while it runs (planning/replan.py): after an out-of-memory, below what
ran out with only the failed part's knobs free; after a float32 retry, for four-byte values."""

from __future__ import annotations

import pytest
import torch

from linfusion_cli import api
from linfusion_cli.pipeline import orchestrator, recovery
from linfusion_cli.planning import replan

from ..model_helpers import bare_context, bare_model

GIB = 2 ** 30


@pytest.fixture(scope="module")
def plan():
    """SD1.5 at 4096 px for an 8 GiB CUDA GPU (planned here without one; configs bundled)."""
    return api.plan("x", model="runwayml/stable-diffusion-v1-5", res=4096, max_vram=8, dry_run=True)


def _knobs(memory, names):
    return {n: getattr(memory, n) for n in names}


def test_after_out_of_memory_the_failed_part_is_replanned_below_it(plan):
    stage = plan.stages[-1]
    budget = replan.lower_budget(stage, None)
    assert budget == int(stage.memory.estimated_peak_gib * GIB * replan.SHARE)
    assert replan.lower_budget(stage, 3.0) == int(3.0 * GIB * replan.SHARE)  # a lower reserved peak wins
    memory = replan.replan(plan, stage, "unet", budget)
    assert memory.knobs() != stage.memory.knobs() and memory.estimated_peak_gib * GIB <= budget
    assert _knobs(memory, replan.VAE_KNOBS) == _knobs(stage.memory, replan.VAE_KNOBS)
    assert memory.vae_decode_mode in ("exact", "estimated")  # decided with the plan, as planned ones
    # the VAE alone cannot bring this stage (its UNet dominates) that low: the caller walks tighter()
    assert replan.replan(plan, stage, "vae", budget) is None


def test_a_float32_part_is_replanned_for_four_bytes_at_the_stages_budget(plan):
    stage = plan.stages[-1]
    budget = replan.planned_budget(plan, stage, "fp32")
    memory = replan.replan(plan, stage, "unet", budget, dtype="fp32")
    assert memory.estimated_peak_gib * GIB <= budget == 8 * GIB  # nothing held beside it here
    assert memory.estimated_peak_gib > stage.memory.estimated_peak_gib  # priced at 4 bytes a value
    assert _knobs(memory, replan.VAE_KNOBS) == _knobs(stage.memory, replan.VAE_KNOBS)


def test_the_run_replans_with_the_planner_where_the_plan_has_its_configs(plan, monkeypatch):
    stage = plan.stages[-1]
    ctx = bare_context(monkeypatch, plan, bare_model(device="cuda", dtype=torch.float16),
                       phases=recovery.Phases())
    retried, how = orchestrator._oom_plan(ctx, stage, "unet", 1, None)
    assert how == {"planned_for_gib": round(replan.lower_budget(stage, None) / GIB, 2)}
    assert retried.memory == replan.replan(plan, stage, "unet", replan.lower_budget(stage, None))
    retried, how = orchestrator._oom_plan(ctx, stage, "vae_decode", 1, None)  # no VAE-only plan fits
    assert how == {"tighter_steps": 2} and retried.memory.vae_tile_px < stage.memory.vae_tile_px
    assert orchestrator._oom_plan(ctx, stage, "unet", 3, None) == (None, {})  # three runs at most
