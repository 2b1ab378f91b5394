"""On a CUDA GPU: offload through accelerate's hooks, the tiled VAE and the recorded peaks.

Skipped without CUDA (CI and the development machines have none); run them on a GPU machine
with `python -m pytest -q -m gpu`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linfusion_cli.pipeline.knobs import read_knobs
from linfusion_cli.runtime.applied import KnobsInEffect
from linfusion_cli.planning.memory.planner import MemoryPlan
from linfusion_cli.models.loading import load_model
from linfusion_cli.pipeline import run_plan
from linfusion_cli.planning.plan import build_plan

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def loaded(tiny_pipeline_dirs):
    return load_model(str(tiny_pipeline_dirs["sd15"]), linfusion="fresh", family="sd15",
                      device="cuda", dtype="fp16")


def _plan(memory: MemoryPlan):
    plan = build_plan(prompt="a boat", width=256, height=256, native=64, strengths=[0.5], steps=4,
                      guidance=5.0, seed=3, scheduler="default", model="tiny", family="sd15",
                      linfusion="fresh")
    return plan.with_memory([memory] * len(plan.stages))


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_on_cuda_keeps_the_image_and_is_removed_after(loaded, offload):
    reference, _ = run_plan(_plan(MemoryPlan(attn_chunk=65536, vae_tile_px=128)), loaded)
    image, record = run_plan(_plan(MemoryPlan(offload=offload, attn_chunk=65536, vae_tile_px=128)),
                             loaded)
    assert all(s["memory_in_effect"]["offload"] == offload for s in record["stages"])
    assert all(s["peak_gib"] is not None and s["peak_gib"] > 0 for s in record["stages"])
    assert read_knobs(loaded.pipe, KnobsInEffect())["offload"] == "none"
    assert all(p.device.type == "cuda" for p in loaded.pipe.unet.parameters())
    assert np.abs(image.astype(int) - reference.astype(int)).max() <= 2
