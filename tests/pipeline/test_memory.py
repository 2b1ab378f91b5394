"""Every field of a stage's memory plan is in effect while the stage runs and gone after it.

The knobs are read back inside the stage (pipeline.knobs.read_knobs: from the modules, and from
the record of what the apply put on them), which is what the run record reports; offload runs accelerate's hooks with the CPU as the execution
device, the same code path a GPU takes, and must leave the image unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest

from linfusion_cli.pipeline.knobs import read_knobs
from linfusion_cli.runtime.applied import KnobsInEffect
from linfusion_cli.planning.memory.planner import MemoryPlan
from linfusion_cli.models.loading import load_model
from linfusion_cli.pipeline import run_plan
from linfusion_cli.planning.plan import build_plan

from ..model_helpers import module_state

OFF = {"offload": "none", "ff_chunk": 0, "cfg_split": False, "inplace": False,
       "skips_on_cpu": False, "band_rows": 0}
CASES = {
    "offload_model": MemoryPlan(offload="model", attn_chunk=64),
    "offload_sequential": MemoryPlan(offload="sequential", attn_chunk=64),
    "ff_chunk": MemoryPlan(ff_chunk=16, attn_chunk=64),
    "cfg_split": MemoryPlan(cfg_split=True, attn_chunk=64),
    "inplace": MemoryPlan(inplace=True, attn_chunk=64),
    "skips_on_cpu": MemoryPlan(skips_on_cpu=True, attn_chunk=64),
    "attn_chunk": MemoryPlan(attn_chunk=32),
    "vae_tile": MemoryPlan(vae_tile_px=64, attn_chunk=64),
    "band_rows": MemoryPlan(band_rows=3, attn_chunk=64),
    "band_rows_all_knobs": MemoryPlan(offload="model", band_rows=2, cfg_split=True, inplace=True,
                                      skips_on_cpu=True, ff_chunk=16, attn_chunk=32),
}


@pytest.fixture(scope="module")
def loaded(tiny_pipeline_dirs):
    return load_model(str(tiny_pipeline_dirs["sd15"]), linfusion="fresh", family="sd15")


def _plan(loaded, memory: MemoryPlan | None):
    plan = build_plan(prompt="a boat", width=128, height=128, native=64, strengths=[0.5], steps=2,
                      guidance=5.0, seed=3, scheduler="default", model=loaded.model,
                      family="sd15", linfusion="fresh", vae_tile_px=0)
    return plan if memory is None else plan.with_memory([memory] * len(plan.stages))


def _expected(memory: MemoryPlan) -> dict:
    return {"offload": memory.offload, "ff_chunk": memory.ff_chunk, "cfg_split": memory.cfg_split,
            "inplace": memory.inplace, "skips_on_cpu": memory.skips_on_cpu,
            "attn_chunk": memory.attn_chunk, "vae_tile_px": memory.vae_tile_px,
            "band_rows": memory.band_rows}


@pytest.mark.parametrize("case", list(CASES))
def test_knob_in_effect_during_the_stage_and_removed_after(loaded, case):
    memory = CASES[case]
    before, modules = read_knobs(loaded.pipe, KnobsInEffect()), module_state(loaded.pipe.unet)
    reference, _ = run_plan(_plan(loaded, MemoryPlan(attn_chunk=64)), loaded)
    image, record = run_plan(_plan(loaded, memory), loaded)
    for stage in record["stages"]:
        assert stage["memory_in_effect"] == _expected(memory), case
    after = read_knobs(loaded.pipe, KnobsInEffect())
    assert after == before and {k: after[k] for k in OFF} == OFF
    assert module_state(loaded.pipe.unet) == modules  # no patch, hook or attribute left behind
    assert all(p.device.type == "cpu" for p in loaded.pipe.unet.parameters())
    diff = np.abs(image.astype(int) - reference.astype(int))
    if case.startswith("offload"):  # the same kernels on the same device: bit for bit
        assert diff.max() == 0
    else:  # other batch shapes, chunks or tiles change float rounding, not the image
        assert diff.max() <= 2 and diff.mean() < 0.05
