"""ControlNet and tile ControlNet: tiled embedding, LinFusion on the ControlNet, vs diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from linfusion_cli.adapters import check_adapters
from linfusion_cli.planning.request import with_adapters
from linfusion_cli.adapters.controlnet import TiledConditioningEmbedding, load_controlnet
from linfusion_cli.attention.module import LinFusionAttention
from linfusion_cli.planning.memory.planner import MemoryPlan
from linfusion_cli.models.loading import load_model
from linfusion_cli.models.tiny import UNET_CONFIGS
from ..adapter_helpers import save_tiny_controlnet
from linfusion_cli.pipeline import StageFinished, run_plan
from linfusion_cli.planning.plan import build_plan
from linfusion_cli.planning.request import Request


@pytest.fixture(scope="module")
def cn_files(tiny_pipeline_dirs, tmp_path_factory):
    """{family: ControlNet folder} made from each tiny UNet, and a control image."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("controlnet")
    files = {f: save_tiny_controlnet(root / f, UNet2DConditionModel.from_pretrained(tiny_pipeline_dirs[f] / "unet"))
             for f in ("sd15", "sdxl")}
    image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(root / "control.png")
    files["image"] = root / "control.png"
    return files


def plan_for(folder, family, adapters, *, linfusion="fresh", **kw):
    args = dict(prompt="a lighthouse", negative="fog", width=128, height=96, native=64,
                strengths=[0.5], steps=4, guidance=6.0, seed=3, scheduler="default",
                model=str(folder), family=family, linfusion=linfusion, vae_tile_px=0)
    args.update(kw)
    plan = build_plan(**args)
    return with_adapters(plan, check_adapters(Request(prompt="x", **adapters), dict(UNET_CONFIGS[family]), plan))


def run(folder, family, adapters, *, linfusion="fresh", memory=None, **kw):
    plan = plan_for(folder, family, adapters, linfusion=linfusion, **kw)
    if memory is not None:
        plan = plan.with_memory([memory] * len(plan.stages))
    model = load_model(str(folder), linfusion=linfusion, channels_last=False, adapters=plan.adapters)
    stages = []
    image, record = run_plan(plan, model, on_event=lambda e: isinstance(e, StageFinished) and stages.append(e.image))
    return stages, record, model


def close(a, b, what=""):
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2, f"{what}: max {diff.max()}, {(diff > 0).mean():.2%}"


def test_tiled_embedding_equals_untiled_and_runs_once(tiny_pipeline_dirs, cn_files):
    from diffusers import ControlNetModel

    inner = ControlNetModel.from_pretrained(cn_files["sd15"]).controlnet_cond_embedding
    tiled = TiledConditioningEmbedding(inner, tile_px=64)
    assert tiled.halo % 8 == 0 and tiled.halo >= 23 and tiled.stride == 8
    x = torch.rand(1, 3, 200, 264).expand(2, 3, 200, 264).contiguous()  # CFG: two equal rows
    calls = []
    inner.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        want = inner(x)
        calls.clear()
        got = tiled(x)
        assert len(calls) == 4 * 5, "tiles of one row only"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert tiled(x) is got, "the same tensor again: cached"
        half = tiled(x[1:].clone())  # a CFG-split half: same content, other storage
        assert torch.equal(half[0], got[0]) and len(calls) == 20, "cached by value"
        tiled.reset()
        tiled(x)
        assert len(calls) == 40


def test_controlnet_self_attention_runs_linfusion(tiny_pipeline_dirs, cn_files):
    from diffusers import ControlNetModel

    model = load_model(str(tiny_pipeline_dirs["sdxl"]), linfusion="fresh")
    plain = ControlNetModel.from_pretrained(cn_files["sdxl"])
    net = load_controlnet(str(cn_files["sdxl"]), model.pipe.unet, "--controlnet")
    names = [n for n in model.linfusion_layers if n.startswith(("down_blocks", "mid_block"))]
    assert net.linfusion_layers == names and names
    for name in names:
        layer, unet_layer = net.get_submodule(name), model.pipe.unet.get_submodule(name)
        assert isinstance(layer, LinFusionAttention)
        assert torch.equal(layer.to_q.weight, plain.get_submodule(name).to_q.weight), "its own q/k/v/out"
        for mlp, ref in ((layer.to_q_, unet_layer.to_q_), (layer.to_k_, unet_layer.to_k_)):
            for a, b in zip(mlp.parameters(), ref.parameters()):
                assert torch.equal(a, b), "the UNet's LinFusion projections"
    assert not [m for m in net.modules() if type(m).__name__ == "Attention" and m.is_cross_attention is False]


def test_controlnets_change_the_image_and_scale_zero_is_plain(tiny_pipeline_dirs, cn_files):
    folder = tiny_pipeline_dirs["sd15"]
    plain, _, _ = run(folder, "sd15", {})
    both = dict(controlnet=str(cn_files["sd15"]), control_image=str(cn_files["image"]),
                tile_controlnet=str(cn_files["sd15"]), tile_scale=0.7)
    acted, record, _ = run(folder, "sd15", both)
    zero, _, _ = run(folder, "sd15", dict(both, control_scale=0.0, tile_scale=0.0))
    tile_only, _, _ = run(folder, "sd15", dict(tile_controlnet=str(cn_files["sd15"])))
    for k in range(2):
        assert np.abs(acted[k].astype(int) - plain[k]).mean() > 2, f"stage {k} changed"
        close(zero[k], plain[k], f"scale 0, stage {k}")
    assert np.array_equal(tile_only[0], plain[0]) and np.abs(tile_only[1].astype(int) - plain[1]).mean() > 2
    assert record["adapters"]["tile_controlnet"]["scale"] == 0.7


def test_cfg_split_gives_the_same_image(tiny_pipeline_dirs, cn_files):
    folder = tiny_pipeline_dirs["sd15"]
    adapters = dict(controlnet=str(cn_files["sd15"]), control_image=str(cn_files["image"]),
                    tile_controlnet=str(cn_files["sd15"]))
    whole, _, _ = run(folder, "sd15", adapters, memory=MemoryPlan())
    split, _, _ = run(folder, "sd15", adapters, memory=MemoryPlan(cfg_split=True, ff_chunk=16, attn_chunk=32))
    for k in range(2):
        close(split[k], whole[k], f"stage {k}")


@pytest.mark.parametrize("cfg_split, skips_on_cpu", [(False, False), (True, False), (True, True)])
def test_residuals_in_place_give_the_identical_image(tiny_pipeline_dirs, cn_files, monkeypatch, cfg_split,
                                                     skips_on_cpu):
    """adapters.residuals (ControlNet run inside each UNet forward, residuals added to the skips
    in place) against diffusers' order (ControlNet on the whole batch, new sums): bit-identical,
    with one ControlNet (base stage) and two (img2img stage); each UNet forward runs its own
    ControlNet call on its rows (1 per CFG half under cfg_split)."""
    from linfusion_cli.adapters import residuals

    folder = tiny_pipeline_dirs["sd15"]
    adapters = dict(controlnet=str(cn_files["sd15"]), control_image=str(cn_files["image"]),
                    tile_controlnet=str(cn_files["sd15"]))
    memory = MemoryPlan(cfg_split=cfg_split, attn_chunk=32, skips_on_cpu=skips_on_cpu)
    batches = []
    real_run = residuals.Deferred.run
    monkeypatch.setattr(residuals.Deferred, "run", lambda self, a, b: batches.append(b - a) or real_run(self, a, b))
    ours, _, _ = run(folder, "sd15", adapters, memory=memory)
    assert batches and set(batches) == {1 if cfg_split else 2}
    monkeypatch.setattr(residuals, "ENABLED", False)
    batches.clear()
    theirs, _, _ = run(folder, "sd15", adapters, memory=memory)
    assert not batches
    for k in range(2):
        assert np.array_equal(ours[k], theirs[k]), f"stage {k}"


def diffusers_reference(folder, cn_folder, control_image, plan, kind):
    """diffusers' own pipelines: ControlNet text-to-image (structure) or plain base + ControlNet
    img2img whose control image is the stage's resized input (tile)."""
    from diffusers import AutoPipelineForImage2Image, ControlNetModel, DiffusionPipeline

    txt = DiffusionPipeline.from_pretrained(folder)
    net = ControlNetModel.from_pretrained(cn_folder)
    common = dict(prompt=plan.prompt, negative_prompt=plan.negative, output_type="np")
    images = []
    for stage in plan.stages:
        kw = dict(common, num_inference_steps=stage.steps, guidance_scale=stage.guidance,
                  generator=torch.Generator().manual_seed(stage.seed))
        if stage.strength is None and kind == "structure":
            from diffusers import AutoPipelineForText2Image

            pipe = AutoPipelineForText2Image.from_pipe(txt, controlnet=net)
            control = Image.open(control_image).convert("RGB").resize((stage.width, stage.height), Image.LANCZOS)
            out = pipe(image=control, height=stage.height, width=stage.width, **kw)
        elif stage.strength is None:
            out = txt(height=stage.height, width=stage.width, **kw)
        else:
            resized = Image.fromarray(images[-1]).resize((stage.width, stage.height), Image.LANCZOS)
            pipe = AutoPipelineForImage2Image.from_pipe(txt, controlnet=net)
            out = pipe(image=resized, control_image=resized, strength=stage.strength,
                       controlnet_conditioning_scale=0.8, **kw)
        images.append((out.images[0] * 255).round().astype(np.uint8))
    return images


@pytest.mark.parametrize("family,kind", [("sd15", "structure"), ("sd15", "tile"), ("sdxl", "tile")])
def test_without_linfusion_equals_diffusers_controlnet_pipelines(tiny_pipeline_dirs, cn_files, family, kind):
    folder = tiny_pipeline_dirs[family]
    if kind == "structure":
        adapters, size = dict(controlnet=str(cn_files[family]), control_image=str(cn_files["image"])), (64, 48)
    else:
        adapters, size = dict(tile_controlnet=str(cn_files[family]), tile_scale=0.8), (128, 96)
    ours, _, _ = run(folder, family, adapters, linfusion=None, width=size[0], height=size[1])
    plan = plan_for(folder, family, adapters, linfusion=None, width=size[0], height=size[1])
    ref = diffusers_reference(folder, cn_files[family], cn_files["image"], plan, kind)
    assert len(ours) == len(ref) == (1 if kind == "structure" else 2)
    for k, (a, b) in enumerate(zip(ours, ref)):
        close(a, b, f"stage {k}")


def test_planner_counts_controlnets_on_the_stages_they_run(tiny_pipeline_dirs, cn_files):
    from linfusion_cli.adapters.controlnet import controlnet_config
    from linfusion_cli.planning.memory.adapter_estimate import controlnet_extra_bytes, controlnet_params, controlnet_unet_extra
    from linfusion_cli.planning.memory.walk import Knobs
    from linfusion_cli.planning.memory.fit import add_memory_plans
    from linfusion_cli.planning.request import make_plan

    base = dict(prompt="x", model=str(tiny_pipeline_dirs["sd15"]), width=1024, height=1024, max_vram=8.0,
                vae_tile=0, no_linfusion=True)
    plain = add_memory_plans(make_plan(Request(**base)))
    tiled = add_memory_plans(make_plan(Request(**base, tile_controlnet=str(cn_files["sd15"]))))
    assert [s.strength is None for s in tiled.stages] == [True, False]
    assert [s.controlnets for s in tiled.stages] == [(), ("tile_controlnet",)]  # the planner's decision
    cfg = dict(UNET_CONFIGS["sd15"])
    configs = [tiled.adapters.tile_controlnet.config]
    assert configs == [controlnet_config(str(cn_files["sd15"]), cfg)]  # derived once, at plan time
    extra = controlnet_extra_bytes(configs, dtype_bytes=2)
    assert extra == controlnet_params(configs[0]) * 2  # weights
    step = controlnet_unet_extra(configs, cfg, width=512, height=512, guidance=True, dtype_bytes=2)
    held = (2 * 3 * 512 * 512 + cfg["block_out_channels"][0] * 64 * 64) * 2  # image, embedding
    assert step(Knobs()) >= held and step(Knobs(cfg_split=True)) >= held
    for a, b in zip(plain.stages, tiled.stages):
        if a.strength is None:
            assert a.memory.estimated_peak_gib == b.memory.estimated_peak_gib
        else:
            assert b.memory.estimated_peak_gib >= a.memory.estimated_peak_gib  # tiny: VAE-bound


@pytest.mark.parametrize("budget", [24.0, 12.0])
def test_16k_tile_controlnet_plans_within_a_12_gib_gpu(budget):
    """SD1.5 16384x8192 with a tile ControlNet: the last stage runs band-wise (the ControlNet
    too) and fits 24 GiB and 12 GiB GPUs by the estimate; at 12 GiB its residuals are parked as
    they are made (skips on the CPU)."""
    from linfusion_cli.planning.memory.fit import add_memory_plans
    from linfusion_cli.planning.request import make_plan

    plan = add_memory_plans(make_plan(Request(prompt="x", preset="sd15", width=16384, height=8192,
                                         max_vram=budget, device="cuda", dry_run=True,
                                         tile_controlnet="lllyasviel/control_v11f1e_sd15_tile")))
    last = plan.stages[-1].memory
    assert last.band_rows and last.estimated_peak_gib <= budget
    assert last.skips_on_cpu or budget > 12


def test_demofusion_stages_give_way_to_sdedit_for_a_controlnet(tiny_pipeline_dirs, cn_files, cli):
    """The DemoFusion stage runs no ControlNet: a preset's demofusion becomes sdedit, and the plan
    says so; an explicit --method demofusion is refused before loading."""
    from linfusion_cli.errors import PlanError
    from linfusion_cli.planning.request import make_plan

    base = dict(prompt="x", preset="sdxl", model=str(tiny_pipeline_dirs["sdxl"]), res=2048,
                steps=4, no_linfusion=True)
    plain = make_plan(Request(**base))
    assert [s.method for s in plain.stages[1:]] == ["demofusion"] * (len(plain.stages) - 1)
    tiled = make_plan(Request(**base, tile_controlnet=str(cn_files["sdxl"])))
    assert [s.method for s in tiled.stages[1:]] == ["sdedit"] * (len(tiled.stages) - 1)
    assert "--tile-controlnet" in tiled.method_from
    with pytest.raises(PlanError, match="--method demofusion does not run --tile-controlnet"):
        make_plan(Request(**base, tile_controlnet=str(cn_files["sdxl"]), method="demofusion"))

    shown = cli("generate", "x", "--preset", "sdxl", "--model", str(tiny_pipeline_dirs["sdxl"]),
                "--res", "2048", "--tile-controlnet", str(cn_files["sdxl"]), "--no-linfusion", "--dry-run")
    assert shown.code == 0, shown.err
    assert "method: sdedit, not preset sdxl's demofusion" in shown.out and "demofusion (" not in shown.out
    refused = cli("generate", "x", "--preset", "sdxl", "--model", str(tiny_pipeline_dirs["sdxl"]),
                  "--res", "2048", "--tile-controlnet", str(cn_files["sdxl"]), "--no-linfusion",
                  "--method", "demofusion")
    assert refused.code == 2 and len(refused.err_lines) == 1, refused.err
