"""The DemoFusion-style stage: its pieces against written-out equations, its reduction to SDEdit,
whole runs on tiny SD1.5 / SD-XL models, and the method in plans and presets."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from linfusion_cli.errors import PlanError, PresetError
from linfusion_cli.planning.method import DemoFusion, denoise_steps, with_method
from linfusion_cli.pipeline import demofusion as df

# --- pieces against slow references ---------------------------------------------------------

# --- the loop: reduction to SDEdit ----------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_no_skip_residual_and_no_dilated_weight_reduce_to_sdedit(tiny_pipeline_dirs, family):
    """cosine_scale_1 and _2 infinite: c1 = c2 = 0, so every step is the plain SDEdit step; the
    only extra is the final match of the latents' mean and std to the encoded input's."""
    from diffusers import AutoPipelineForImage2Image
    from diffusers.utils.torch_utils import randn_tensor

    from linfusion_cli.models.loading import load_model
    from linfusion_cli.pipeline.demofusion_stage import conditioning, denoise, truncated_timesteps

    model = load_model(str(tiny_pipeline_dirs[family]), linfusion="fresh", scheduler="euler",
                       channels_last=False)
    img2img = AutoPipelineForImage2Image.from_pipe(model.pipe)
    img2img.set_progress_bar_config(disable=True)
    h, w, steps, strength, guidance = 12, 16, 10, 0.5, 5.0
    x0 = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        sdedit = img2img(prompt="a lighthouse", image=x0, strength=strength, num_inference_steps=steps,
                         guidance_scale=guidance, generator=torch.Generator().manual_seed(9),
                         output_type="latent").images

        def ours(settings):
            g = torch.Generator().manual_seed(9)
            cond = conditioning(model.pipe, "a lighthouse", None, guidance, w * 8, h * 8, "cpu")
            timesteps = truncated_timesteps(model.pipe.scheduler, steps, denoise_steps(steps, strength, "demofusion"), "cpu")
            noise = randn_tensor(x0.shape, generator=g)  # img2img's first draw from its generator
            return denoise(model.pipe.unet, model.pipe.scheduler, x0, noise, timesteps, cond, guidance,
                           settings, g)

        reduced = ours(DemoFusion(math.inf, math.inf, 1.0, 0.8, dilation=2))
        full = ours(DemoFusion(3.0, 1.0, 1.0, 0.8, dilation=2))
    expected = df.match_stats(sdedit, x0.mean(dim=(2, 3), keepdim=True), x0.std(dim=(2, 3), keepdim=True))
    torch.testing.assert_close(reduced, expected, atol=2e-5, rtol=1e-5)
    assert (full - expected).abs().max() > 1e-2, "the skip residual and dilated pass change the result"


# --- whole stages ---------------------------------------------------------------------------

def demo_plan(folder, family, method, **settings):
    from linfusion_cli.planning.plan import build_plan

    plan = build_plan(prompt="a lighthouse", width=128, height=96, native=64, strengths=[0.5],
                      steps=6, guidance=6.0, seed=7, scheduler="default", model=str(folder),
                      family=family, linfusion=None, vae_tile_px=64)
    return with_method(plan, method, DemoFusion(**settings), trained=32)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_demofusion_ladder_runs_deterministically_and_restores_the_unet(tiny_pipeline_dirs, family, monkeypatch):
    from linfusion_cli.models.loading import load_model
    from linfusion_cli.pipeline import run_plan

    folder = tiny_pipeline_dirs[family]
    model = load_model(str(folder), linfusion="fresh", scheduler="euler")
    plan = demo_plan(folder, family, "demofusion", gaussian_sigma=0.8)
    assert [(s.method, s.demofusion and s.demofusion.dilation) for s in plan.stages] == [(None, None), ("demofusion", 4)]
    scales = []
    real = df.dilated_convs

    def spy(unet, scale):
        scales.append(scale)
        return real(unet, scale)

    monkeypatch.setattr("linfusion_cli.pipeline.demofusion_stage.dilated_convs", spy)
    a, record = run_plan(plan, model)
    assert a.shape == (96, 128, 3)
    assert scales == [4] * plan.stages[1].denoise_steps  # one dilated pass per step
    assert all(m.dilation == (1, 1) for m in model.pipe.unet.modules() if isinstance(m, nn.Conv2d))
    stage = record["stages"][1]
    assert stage["method"] == "demofusion" and stage["demofusion"]["dilation"] == 4
    assert stage["vae"]["encode"]["tiles"] > 1 and stage["vae"]["decode"]["tiles"] > 1  # tiled VAE
    b, _ = run_plan(plan, model)
    assert np.array_equal(a, b)
    c, _ = run_plan(demo_plan(folder, family, "sdedit"), model)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1


def test_method_sdedit_is_todays_stage_bit_for_bit(tiny_pipeline_dirs):
    from linfusion_cli.models.loading import load_model
    from linfusion_cli.pipeline import run_plan

    folder = tiny_pipeline_dirs["sd15"]
    model = load_model(str(folder), linfusion="fresh")
    plan = demo_plan(folder, "sd15", "sdedit")
    today = replace(plan, stages=tuple(replace(s, method=None) for s in plan.stages))
    assert plan.stages[1].method == "sdedit" and plan.stages[1].denoise_steps == today.stages[1].denoise_steps
    a, _ = run_plan(plan, model)
    b, _ = run_plan(today, model)
    assert np.array_equal(a, b)


# --- plans, presets, planner ----------------------------------------------------------------

def test_plan_method_from_flag_and_preset(monkeypatch):
    from linfusion_cli.planning.request import Request, make_plan

    req = Request(prompt="x", model="demo-sdxl", res=2048, steps=10, max_vram=8, device="cpu")
    sdxl = make_plan(replace(req, preset="sdxl"))
    s = sdxl.stages[1]
    assert s.method == "demofusion" and s.demofusion == DemoFusion(3.0, 1.0, 1.0, 0.8, dilation=8)
    assert s.denoise_steps == 4  # ceil(10 x 0.32), as the official pipeline counts
    assert sdxl.stages[0].method is None
    assert make_plan(replace(req, preset="sdxl", method="sdedit")).stages[1].method == "sdedit"
    assert make_plan(req).stages[1].method == "demofusion"  # an SD-XL model: sdxl preset
    sd15 = replace(req, preset="sd15")
    assert make_plan(sd15).stages[1].method == "sdedit"  # sd15 preset: sdedit
    assert make_plan(replace(sd15, method="demofusion")).stages[1].demofusion.gaussian_sigma == 1.0
    with pytest.raises(PlanError, match="unknown method"):
        make_plan(replace(req, method="tiled"))


@pytest.mark.parametrize("text,match", [
    ("method: magic\n", "unknown method"), ("cosine_scale_2: -1\n", "cosine_scale_2"),
    ("gaussian_sigma: 0\n", "gaussian_sigma"), ("cosine_scale_1: fast\n", "wrong type")])
def test_bad_method_keys_in_presets_are_named(text, match):
    from linfusion_cli.planning.presets import parse_preset

    with pytest.raises(PresetError, match=match):
        parse_preset(text, name="p", source="p.yaml")


def test_planner_counts_the_dilated_pass():
    from linfusion_cli.planning.memory import estimate as est
    from linfusion_cli.planning.memory.planner import load_family_configs, choose_knobs

    unet, vae = load_family_configs("sdxl")
    size = dict(width=16384, height=16384, dtype_bytes=2)
    kw = dict(size, knobs=est.Knobs(vae_tile_px=1024), device="cuda")
    extra = est.dilated_pass_bytes(unet, latent_h=2048, latent_w=2048)
    assert extra == 4 * 4 * 2048 * 2048 * 4  # four fp32 latents
    plain = est.estimate_peak_bytes(unet, vae, **kw)
    dilated = est.estimate_peak_bytes(unet, vae, dilated_pass=True, **kw)
    assert dilated - plain == pytest.approx(extra * (1 + est.OVERHEAD), abs=2)
    breakdown = est.peak_breakdown(unet, vae, dilated_pass=True, **kw)
    assert breakdown["total"] == dilated and breakdown["unet_terms"]["DemoFusion latents (dilated pass)"] == extra
    # a 4096 px stage under 24 GiB: the budget its plain plan fills exactly is too small for that
    # plan with the dilated pass, so the planner picks a tighter one
    # (small VAE tiles forced, so that the UNet, not the VAE, sets the peak)
    size = dict(width=4096, height=4096, dtype_bytes=2, fixed={"vae_tile_px": 512})
    a = choose_knobs(unet, vae, **size, budget_bytes=24 * 2 ** 30)
    budget = est.estimate_peak_bytes(unet, vae, width=4096, height=4096, dtype_bytes=2, knobs=a.knobs())
    assert choose_knobs(unet, vae, **size, budget_bytes=budget) == a
    b = choose_knobs(unet, vae, **size, budget_bytes=budget, dilated_pass=True)
    assert b.knobs() != a.knobs() and b.slowdown(4096, 4096) >= a.slowdown(4096, 4096)


def test_memory_knobs_apply_to_both_passes_and_keep_the_image(tiny_pipeline_dirs):
    from linfusion_cli.planning.memory.planner import MemoryPlan
    from linfusion_cli.models.loading import load_model
    from linfusion_cli.pipeline import run_plan

    folder = tiny_pipeline_dirs["sdxl"]
    model = load_model(str(folder), linfusion="fresh", scheduler="euler", channels_last=False)
    plan = demo_plan(folder, "sdxl", "demofusion", gaussian_sigma=0.8)
    loose = plan.with_memory([MemoryPlan(vae_tile_px=64)] * 2)
    tight = plan.with_memory([MemoryPlan(vae_tile_px=64, cfg_split=True, ff_chunk=16, attn_chunk=32,
                                         inplace=True, skips_on_cpu=True)] * 2)
    calls = []
    hook = model.pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        a, _ = run_plan(loose, model)
        n_loose = len(calls)
        assert set(calls) == {2}
        calls.clear()
        b, record = run_plan(tight, model)
    finally:
        hook.remove()
    assert record["stages"][1]["memory"]["cfg_split"] is True
    assert len(calls) == 2 * n_loose and set(calls) == {1}, "cfg_split halves every UNet call, both passes"
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1
