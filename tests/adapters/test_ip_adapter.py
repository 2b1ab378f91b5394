"""IP-Adapter (h94 layout): with LinFusion, against diffusers' own pipeline, and CLI checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from linfusion_cli.adapters import check_adapters
from linfusion_cli.planning.request import with_adapters
from linfusion_cli.attention.module import LinFusionAttention
from linfusion_cli.models.loading import load_model
from linfusion_cli.models.tiny import UNET_CONFIGS
from ..adapter_helpers import save_tiny_ip_adapter
from linfusion_cli.pipeline import StageFinished, run_plan
from linfusion_cli.planning.plan import build_plan
from linfusion_cli.planning.request import Request

from ..cli_helpers import one_error, write_preset


@pytest.fixture(scope="module")
def ip_files(tiny_pipeline_dirs, tmp_path_factory):
    """{family: adapter file (image_encoder/ beside it)} and a reference image."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("ip")
    files = {f: save_tiny_ip_adapter(root / f, UNet2DConditionModel.from_pretrained(tiny_pipeline_dirs[f] / "unet"))
             for f in ("sd15", "sdxl")}
    Image.fromarray((np.random.default_rng(1).random((40, 60, 3)) * 255).astype(np.uint8)).save(root / "ref.png")
    files["image"] = root / "ref.png"
    return files


def run(folder, family, adapters, *, linfusion="fresh", **kw):
    args = dict(prompt="a lighthouse", negative="fog", width=128, height=96, native=64,
                strengths=[0.5], steps=4, guidance=6.0, seed=3, scheduler="default",
                model=str(folder), family=family, linfusion=linfusion, vae_tile_px=0)
    args.update(kw)
    plan = build_plan(**args)
    plan = with_adapters(plan, check_adapters(Request(prompt="x", **adapters), dict(UNET_CONFIGS[family]), plan))
    model = load_model(str(folder), linfusion=linfusion, channels_last=False, adapters=plan.adapters)
    stages = []
    run_plan(plan, model, on_event=lambda e: isinstance(e, StageFinished) and stages.append(e.image))
    return stages, plan, model


def close(a, b, what=""):
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2, f"{what}: max {diff.max()}, {(diff > 0).mean():.2%}"


def test_ip_adapter_changes_the_image_scale_zero_is_plain_linfusion_kept(tiny_pipeline_dirs, ip_files):
    folder = tiny_pipeline_dirs["sd15"]
    plain, _, _ = run(folder, "sd15", {})
    spec = dict(ip_adapter=str(ip_files["sd15"]), ip_image=str(ip_files["image"]))
    acted, plan, model = run(folder, "sd15", dict(spec, ip_scale=0.8))
    zero, _, _ = run(folder, "sd15", dict(spec, ip_scale=0.0))
    for k in range(2):
        assert np.abs(acted[k].astype(int) - plain[k]).mean() > 2, f"stage {k} changed"
        close(zero[k], plain[k], f"scale 0, stage {k}")
    unet = model.pipe.unet
    assert all(isinstance(unet.get_submodule(n), LinFusionAttention) for n in model.linfusion_layers)
    processors = unet.attn_processors
    assert processors and all(n.endswith("attn2.processor") for n in processors), "attn1 is LinFusion's"
    assert {type(p).__name__ for p in processors.values()} <= {"IPAdapterAttnProcessor2_0", "IPAdapterAttnProcessor"}
    assert plan.adapters.ip_adapter.scale == 0.8


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_one_stage_without_linfusion_equals_diffusers_ip_adapter(tiny_pipeline_dirs, ip_files, family):
    from diffusers import DiffusionPipeline

    folder, path = tiny_pipeline_dirs[family], ip_files[family]
    ours, plan, _ = run(folder, family, dict(ip_adapter=str(path), ip_image=str(ip_files["image"]), ip_scale=0.6),
                        linfusion=None, width=64, height=64)
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name)
    pipe.set_ip_adapter_scale(0.6)
    stage = plan.stages[0]
    out = pipe(prompt=plan.prompt, negative_prompt=plan.negative, num_inference_steps=stage.steps,
               guidance_scale=stage.guidance, height=64, width=64, output_type="np",
               ip_adapter_image=Image.open(ip_files["image"]).convert("RGB"),
               generator=torch.Generator().manual_seed(stage.seed))
    assert len(ours) == 1
    close(ours[0], (out.images[0] * 255).round().astype(np.uint8))


def test_cli_ip_adapter_dry_run_metadata_and_bad_input(cli, tmp_path):
    import shutil

    from diffusers import UNet2DConditionModel

    from linfusion_cli.models.tiny import DEMO_UNET_CONFIGS

    from ..adapter_helpers import save_tiny_lora
    from linfusion_cli.io.metadata import read_metadata

    torch.manual_seed(0)
    ip = save_tiny_ip_adapter(tmp_path / "ip", UNet2DConditionModel(**DEMO_UNET_CONFIGS["sd15"]))
    xl = save_tiny_ip_adapter(tmp_path / "ipxl", UNet2DConditionModel(**DEMO_UNET_CONFIGS["sdxl"]))
    lora = save_tiny_lora(tmp_path / "lora.safetensors", UNet2DConditionModel(**DEMO_UNET_CONFIGS["sd15"]))
    alone = tmp_path / "alone" / "ip.safetensors"
    alone.parent.mkdir()
    shutil.copy(ip, alone)
    ref = tmp_path / "ref.png"
    Image.new("RGB", (30, 30), (10, 200, 10)).save(ref)
    write_preset(tmp_path / "config" / "presets" / "tiny.yaml")
    demo = ("--preset", "tiny", "--res", "64")
    dry = cli("generate", "cat", *demo, "--ip-adapter", ip, "--ip-image", ref, "--ip-scale", "0.4", "--dry-run")
    assert dry.code == 0 and f"IP-Adapter {ip} x0.4, image {ref}" in dry.out, dry.err
    ok = cli("generate", "cat", *demo, "--ip-adapter", ip, "--ip-image", ref, "-o", tmp_path / "a.png")
    assert ok.code == 0, ok.err
    meta = read_metadata(tmp_path / "a.png")
    assert 'IP-Adapter: "Model: ip-adapter.safetensors, Weight: 1"' in meta["parameters"]
    assert meta["record"]["adapters"]["ip_adapter"]["encoder"] == str(ip.parent / "image_encoder")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"GIF89a nope")
    one_error(cli("generate", "cat", *demo, "--ip-adapter", ip, "--ip-image", broken), "--ip-image")
    one_error(cli("generate", "cat", *demo, "--ip-adapter", tmp_path / "no.safetensors", "--ip-image", ref), "not found")
    one_error(cli("generate", "cat", *demo, "--ip-adapter", lora, "--ip-image", ref), "h94 layout")
    one_error(cli("generate", "cat", *demo, "--ip-adapter", xl, "--ip-image", ref), "cross-attention")
    one_error(cli("generate", "cat", *demo, "--ip-adapter", alone, "--ip-image", ref), "--ip-encoder")
    one_error(cli("generate", "cat", *demo, "--ip-adapter", ip), "--ip-image")
    ok2 = cli("generate", "cat", *demo, "--ip-adapter", alone, "--ip-image", ref,
              "--ip-encoder", ip.parent / "image_encoder", "--dry-run")
    assert ok2.code == 0, ok2.err
