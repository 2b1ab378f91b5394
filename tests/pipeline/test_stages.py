"""The orchestrator against diffusers' own pipelines, stage by stage, and ladder behaviour."""

import numpy as np
import pytest
import torch
from PIL import Image

from linfusion_cli.models.loading import load_model
from linfusion_cli.pipeline import StageFinished, run_plan
from linfusion_cli.planning.plan import build_plan


def make_plan(model, family, **kw):
    args = dict(prompt="a lighthouse", negative="fog", width=256, height=192, native=64,
                strengths=[0.5, 0.35], steps=6, guidance=6.0, seed=7, scheduler="default",
                model=str(model), family=family, linfusion=None, vae_tile_px=0)
    args.update(kw)
    return build_plan(**args)


def diffusers_reference(folder, plan, linfusion: bool):
    """The same ladder with diffusers' text-to-image and img2img pipelines, untouched."""
    from diffusers import AutoPipelineForImage2Image, DiffusionPipeline

    from linfusion_cli.attention import apply_linfusion

    txt = DiffusionPipeline.from_pretrained(folder)
    if linfusion:
        apply_linfusion(txt.unet)
    img = AutoPipelineForImage2Image.from_pipe(txt)
    common = dict(prompt=plan.prompt, negative_prompt=plan.negative, output_type="pil")
    images = []
    for stage in plan.stages:
        gen = torch.Generator().manual_seed(stage.seed)
        kw = dict(common, num_inference_steps=stage.steps, guidance_scale=stage.guidance, generator=gen)
        if stage.strength is None:
            image = txt(height=stage.height, width=stage.width, **kw).images[0]
        else:
            resized = images[-1].resize((stage.width, stage.height), Image.LANCZOS)
            image = img(image=resized, strength=stage.strength, **kw).images[0]
        images.append(image)
    return [np.asarray(i) for i in images]


@pytest.mark.parametrize("family,linfusion", [("sd15", False), ("sd15", True), ("sd21", False), ("sdxl", True)])
def test_untiled_pipeline_equals_diffusers_stage_by_stage(tiny_pipeline_dirs, family, linfusion):
    folder = tiny_pipeline_dirs[family]
    # channels_last off: diffusers' reference runs contiguous, and the layout changes summation order
    model = load_model(str(folder), linfusion="fresh" if linfusion else None, channels_last=False)
    assert model.family == family
    plan = make_plan(folder, family)
    ours = []
    final, record = run_plan(plan, model, on_event=lambda e: isinstance(e, StageFinished) and ours.append(e.image))
    reference = diffusers_reference(folder, plan, linfusion)
    assert [i.shape for i in ours] == [i.shape for i in reference]
    for k, (a, b) in enumerate(zip(ours, reference)):
        diff = np.abs(a.astype(int) - b.astype(int))  # uint8 rounding of equal floats may tie-break apart
        assert diff.max() <= 1, f"stage {k}: max diff {diff.max()}"
        assert (diff > 0).mean() < 1e-2, f"stage {k}: {(diff > 0).mean():.2%} pixels differ"
    assert final is ours[-1] and final.shape == (192, 256, 3)
    assert [s["width"] for s in record["stages"]] == [64, 128, 256]


@pytest.mark.slow  # a full-size meta trace or several runs: not the quick tier
def test_three_stage_ladder_sizes_and_determinism(tiny_pipeline_dirs):
    folder = tiny_pipeline_dirs["sd15"]
    model = load_model(str(folder), linfusion="fresh")
    plan = make_plan(folder, "sd15", width=264, height=200, vae_tile_px=64, strengths=[0.4, 0.3])
    sizes = [(s.width, s.height) for s in plan.stages]
    assert sizes == [(64, 48), (128, 96), (264, 200)]  # short side 200 ~ 64 x 2^2; x2 each, rounded to 8
    seen = []
    a, _ = run_plan(plan, model, on_event=lambda e: isinstance(e, StageFinished) and seen.append(e.image.shape))
    b, _ = run_plan(plan, model)
    assert seen == [(h, w, 3) for w, h in sizes]
    assert np.array_equal(a, b)
    c, _ = run_plan(make_plan(folder, "sd15", width=264, height=200, vae_tile_px=64, strengths=[0.4, 0.3], seed=8), model)
    assert not np.array_equal(a, c)


def test_upscale_from_an_existing_image(tiny_pipeline_dirs):
    folder = tiny_pipeline_dirs["sd15"]
    model = load_model(str(folder), linfusion="fresh")
    start = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    plan = make_plan(folder, "sd15", width=224, height=160, init_size=(56, 40), init_image="x.png")
    assert [(s.width, s.height, s.strength) for s in plan.stages] == [(112, 80, 0.5), (224, 160, 0.35)]
    image, record = run_plan(plan, model, init_image=start)
    assert image.shape == (160, 224, 3) and record["init_image"] == "x.png"


@pytest.mark.slow  # a full-size meta trace or several runs: not the quick tier
def test_channels_last_default_on_cpu_changes_pixels_by_rounding_only(tiny_pipeline_dirs):
    folder = tiny_pipeline_dirs["sd15"]
    plan = make_plan(folder, "sd15", vae_tile_px=64)
    fast = load_model(str(folder), linfusion="fresh")
    assert fast.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    a, _ = run_plan(plan, fast)
    b, _ = run_plan(plan, load_model(str(folder), linfusion="fresh", channels_last=False))
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05
