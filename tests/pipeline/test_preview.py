"""--preview's pure parts: x0 from a scheduler step, pooling, latent2rgb, the preview's geometry,
bytes and fit under a budget, and the scheduler wrapper that reads a step without changing it."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from linfusion_cli.models.taesd import TaesdInfo
from linfusion_cli.pipeline import preview as pv
from linfusion_cli.planning import preview_plan as planned

REAL_TAESD = TaesdInfo(source="madebyollin/taesd", folder="x", decoder_params=1_222_531, decoder_width=64)


def _scheduler(name: str, prediction: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from linfusion_cli.models.tiny import SCHEDULER_CONFIG

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}[name]
    config = {k: v for k, v in SCHEDULER_CONFIG.items() if k in inspect.signature(cls).parameters}
    scheduler = cls(**config, prediction_type=prediction)
    scheduler.set_timesteps(10)
    return scheduler


@pytest.mark.parametrize("name,prediction", [("ddim", "epsilon"), ("ddim", "v_prediction"),
                                             ("euler", "epsilon"), ("euler", "v_prediction")])
def test_x0_is_the_schedulers_own_prediction(name, prediction):
    """After a step, x0_from(sample, model output) equals the pred_original_sample the scheduler
    itself computed, and pooling first gives the pooled x0 (the formulas are linear)."""
    scheduler = _scheduler(name, prediction)
    g = torch.Generator().manual_seed(0)
    sample, output = torch.randn(1, 4, 16, 12, generator=g), torch.randn(1, 4, 16, 12, generator=g)
    t = scheduler.timesteps[3]
    for early in scheduler.timesteps[:3]:  # a step index past the first
        scheduler.step(output, early, sample)
    own = scheduler.step(output, t, sample).pred_original_sample
    ours = pv.x0_from(scheduler, sample, output, t)
    torch.testing.assert_close(ours, own, rtol=1e-4, atol=1e-4)
    pooled = pv.x0_from(scheduler, pv.pool(sample, 4), pv.pool(output, 4), t)
    torch.testing.assert_close(pooled, pv.pool(own, 4), rtol=1e-4, atol=1e-4)


def test_pool_averages_blocks_and_leaves_its_input_alone():
    x = torch.arange(2 * 5 * 6, dtype=torch.float16).reshape(1, 2, 5, 6)
    before = x.clone()
    pooled = pv.pool(x, 2)
    assert pooled.shape == (1, 2, 3, 3) and pooled.dtype == torch.float32
    assert pooled[0, 0, 0, 0] == x[0, 0, :2, :2].float().mean()
    assert pooled[0, 0, 2, 2] == x[0, 0, 4:, 4:].float().mean()  # the edge block: what is left
    assert torch.equal(x, before)


def test_latent2rgb_uses_the_published_factors():
    """A latent of channel c = 1 maps to row c of the family's factors (+ bias), as (rgb+1)/2."""
    for family, c in (("sd15", 3), ("sd21", 0), ("sdxl", 1)):
        x = torch.zeros(1, 4, 2, 3)
        x[0, c] = 1
        rgb = pv.latent_to_rgb(x, family)
        factors, bias = pv.LATENT_RGB[family]
        want = np.round(np.clip((np.array(factors[c]) + np.array(bias) + 1) / 2, 0, 1) * 255)
        assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
        assert (rgb == want.astype(np.uint8)).all()
    assert pv.LATENT_RGB["sd15"][0][3] == (-0.2120, -0.2616, -0.7177)
    assert pv.LATENT_RGB["sdxl"][1] == (0.1084, -0.0175, -0.0011)


def test_the_preview_reads_a_small_grid_whatever_the_stage():
    """16384x8192 at --preview-size 1024: latent2rgb pools the 2048x1024 latent by 2, TAESD by 16
    (its 128x64 grid decodes to 1024x512); the bytes are those of the grid, not of the stage."""
    grid, pool, w, h = planned.geometry("latent2rgb", 16384, 8192, 1024)
    assert (grid, pool, w, h) == ((1024, 512), 2, 1024, 512)
    grid, pool, w, h = planned.geometry("taesd", 16384, 8192, 1024)
    assert (grid, pool, w, h) == ((128, 64), 16, 1024, 512)
    assert planned.geometry("taesd", 512, 512, 1024) == ((64, 64), 1, 512, 512)  # never above the stage
    sizes = [planned.geometry("taesd", s, s, 1024)[0] for s in (4096, 8192, 16384)]
    assert len(set(sizes)) == 1
    taesd = planned.preview_bytes("taesd", (128, 128), dtype_bytes=2, vae_bytes=2, decoder=REAL_TAESD)
    latent = planned.preview_bytes("latent2rgb", (1024, 1024), dtype_bytes=2, vae_bytes=2)
    assert taesd < 600 * 2 ** 20 and latent < 64 * 2 ** 20
    # the stage's whole latent alone, at 16K fp16, is more than latent2rgb's preview
    assert latent < 4 * 2048 * 2048 * 2 * 2


def test_fit_shrinks_the_preview_into_the_room_left():
    from linfusion_cli.planning.plan import Stage

    stage = Stage(3, 8192, 8192, 0.2, 50, 1, 7.5, "ddim")
    plan = planned.PreviewPlan(path="p.png", asked="taesd", method="taesd", size=1024, every=None,
                               taesd=REAL_TAESD)
    whole = planned.fit(plan, stage, None, dtype_bytes=2, vae_bytes=2)
    assert (whole.method, whole.width, whole.every) == ("taesd", 1024, 1)  # 10 steps: every step
    half = planned.fit(plan, stage, whole.bytes - 1, dtype_bytes=2, vae_bytes=2)
    assert (half.method, half.width) == ("taesd", 512) and half.bytes < whole.bytes
    tight = planned.fit(plan, stage, 4 << 20, dtype_bytes=2, vae_bytes=2)
    assert tight.method == "latent2rgb" and tight.bytes <= 4 << 20
    assert planned.fit(plan, stage, 0, dtype_bytes=2, vae_bytes=2) is None


def test_the_wrapped_step_keeps_its_signature_and_result_and_goes_away():
    """The pipelines read scheduler.step's parameters (eta, generator); the wrapper shows the
    same, returns the same tensors, and the class's method is back after the stage."""
    from linfusion_cli.planning.plan import Stage

    scheduler = _scheduler("ddim", "epsilon")
    stage = Stage(0, 64, 64, None, 2, 1, 7.5, "ddim")
    plan = planned.PreviewPlan(path="unused.png", asked="latent2rgb", method="latent2rgb", size=64,
                               every=1, stages=(planned.fit(planned.PreviewPlan(
                                   "unused.png", "latent2rgb", "latent2rgb", 64, 1), stage, None,
                                   dtype_bytes=4, vae_bytes=4),))
    previewer = pv.Previewer.__new__(pv.Previewer)  # no file: only the capture is exercised
    previewer.plan, previewer.failed = plan, False
    sample, output = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    before = inspect.signature(scheduler.step).parameters.keys()
    expected = _scheduler("ddim", "epsilon").step(output, scheduler.timesteps[0], sample).prev_sample
    with pv.watching(previewer, stage, scheduler) as watch:
        assert inspect.signature(scheduler.step).parameters.keys() == before
        assert {"eta", "generator"} <= set(before)
        got = scheduler.step(output, scheduler.timesteps[0], sample, return_dict=False)[0]
        assert watch.captured is not None and watch.captured[0].shape == (1, 4, 8, 8)
    assert torch.equal(got, expected)
    assert "step" not in vars(scheduler)
