"""LoRA: kohya and peft files of the same weights, through LinFusion and against diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linfusion_cli.adapters import check_adapters
from linfusion_cli.adapters.specs import AdapterSpecs
from linfusion_cli.attention.module import LinFusionAttention
from linfusion_cli.models.loading import load_model
from linfusion_cli.models.tiny import UNET_CONFIGS
from ..adapter_helpers import save_tiny_lora
from linfusion_cli.pipeline import StageFinished, run_plan
from linfusion_cli.planning.plan import build_plan
from linfusion_cli.planning.request import Request

from ..cli_helpers import one_error


@pytest.fixture(scope="module")
def lora_files(tiny_pipeline_dirs, tmp_path_factory):
    """{(family, layout): path}: one random LoRA per family, written in both layouts."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("lora")
    files = {}
    for family in ("sd15", "sdxl"):
        unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dirs[family] / "unet")
        for layout in ("kohya", "peft"):
            files[family, layout] = save_tiny_lora(root / f"{family}-{layout}.safetensors", unet, layout)
    return files


def adapters_for(family, *loras):
    return check_adapters(Request(prompt="x", loras=tuple(loras)), dict(UNET_CONFIGS[family]))


def plan_for(folder, family, adapters, *, linfusion="fresh", **kw):
    args = dict(prompt="a lighthouse", negative="fog", width=128, height=96, native=64,
                strengths=[0.5], steps=4, guidance=6.0, seed=3, scheduler="default",
                model=str(folder), family=family, linfusion=linfusion, vae_tile_px=0)
    args.update(kw)
    from dataclasses import replace

    return replace(build_plan(**args), adapters=adapters)


def run(folder, family, adapters, linfusion="fresh", **kw):
    plan = plan_for(folder, family, adapters, linfusion=linfusion, **kw)
    model = load_model(str(folder), linfusion=linfusion, channels_last=False, adapters=adapters)
    stages = []
    image, record = run_plan(plan, model, on_event=lambda e: isinstance(e, StageFinished) and stages.append(e.image))
    return image, record, model, stages


def test_kohya_and_peft_agree_change_the_image_and_weight_zero_is_plain(tiny_pipeline_dirs, lora_files):
    folder = tiny_pipeline_dirs["sd15"]
    plain, _, _, _ = run(folder, "sd15", AdapterSpecs())
    kohya, record, model, _ = run(folder, "sd15", adapters_for("sd15", f"{lora_files['sd15', 'kohya']}:0.8"))
    peft, _, _, _ = run(folder, "sd15", adapters_for("sd15", f"{lora_files['sd15', 'peft']}:0.8"))
    zero, _, _, _ = run(folder, "sd15", adapters_for("sd15", f"{lora_files['sd15', 'kohya']}:0"))
    assert np.abs(kohya.astype(int) - plain.astype(int)).mean() > 2, "the LoRA changes the image"
    assert np.abs(kohya.astype(int) - peft.astype(int)).max() <= 1
    assert np.array_equal(zero, plain)
    assert record["adapters"]["loras"][0]["layout"] == "kohya"
    assert record["adapters"]["loras"][0]["weight"] == 0.8


def test_lora_reaches_the_linfusion_projections(tiny_pipeline_dirs, lora_files):
    folder = tiny_pipeline_dirs["sd15"]
    model = load_model(str(folder), linfusion="fresh", adapters=adapters_for("sd15", str(lora_files["sd15", "peft"])))
    layers = [m for m in model.pipe.unet.modules() if isinstance(m, LinFusionAttention)]
    assert layers and len(layers) == len(model.linfusion_layers)
    for layer in layers:
        for proj in (layer.to_q, layer.to_k, layer.to_v, layer.to_out[0]):
            assert hasattr(proj, "lora_A") and "sd15-peft" in proj.lora_A, type(proj)
        assert not hasattr(layer.to_q_[0], "lora_A"), "the LinFusion MLPs are not LoRA targets"


def diffusers_with_lora(folder, path, weight, plan):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="ref")
    pipe.set_adapters(["ref"], adapter_weights=[weight])
    stage = plan.stages[0]
    out = pipe(prompt=plan.prompt, negative_prompt=plan.negative, num_inference_steps=stage.steps,
               guidance_scale=stage.guidance, height=stage.height, width=stage.width,
               generator=torch.Generator().manual_seed(stage.seed), output_type="np")
    return (out.images[0] * 255).round().astype(np.uint8)


@pytest.mark.parametrize("family,layout", [("sd15", "kohya"), ("sdxl", "peft")])
def test_one_stage_without_linfusion_equals_diffusers_with_the_lora(tiny_pipeline_dirs, lora_files, family, layout):
    folder = tiny_pipeline_dirs[family]
    path = lora_files[family, layout]
    adapters = adapters_for(family, f"{path}:0.7")
    ours, _, _, _ = run(folder, family, adapters, linfusion=None, width=64, height=64)
    plan = plan_for(folder, family, adapters, linfusion=None, width=64, height=64)
    assert len(plan.stages) == 1
    ref = diffusers_with_lora(folder, path, 0.7, plan)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2


def test_parse_and_check(lora_files, tmp_path):
    from linfusion_cli.adapters import parse_lora
    from linfusion_cli.errors import CheckpointMismatchError, InputError, ModelNotFoundError

    assert parse_lora("owner/repo:0.25").weight == 0.25 and parse_lora("owner/repo").source == "owner/repo"
    spec = adapters_for("sd15", str(lora_files["sd15", "kohya"]), str(lora_files["sd15", "kohya"])).loras
    assert [s.name for s in spec] == ["sd15-kohya", "sd15-kohya-2"] and spec[0].weight == 1.0
    assert len(spec[0].hash) == 10
    with pytest.raises(InputError, match="not a number"):
        parse_lora(f"{lora_files['sd15', 'kohya']}:strong")
    with pytest.raises(ModelNotFoundError):
        adapters_for("sd15", str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="cross-attention"):
        adapters_for("sd15", str(lora_files["sdxl", "peft"]))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a readable"):
        adapters_for("sd15", str(junk))


def test_cli_lora_dry_run_metadata_and_bad_input(cli, tmp_path):
    from diffusers import UNet2DConditionModel

    from linfusion_cli.models.tiny import DEMO_UNET_CONFIGS
    from linfusion_cli.io.metadata import read_metadata

    torch.manual_seed(0)
    lora = save_tiny_lora(tmp_path / "style.safetensors", UNet2DConditionModel(**DEMO_UNET_CONFIGS["sd15"]), "kohya")
    xl = save_tiny_lora(tmp_path / "xl.safetensors", UNet2DConditionModel(**DEMO_UNET_CONFIGS["sdxl"]), "peft")
    demo = ("--model", "demo", "--steps", "2", "--res", "64")
    dry = cli("generate", "cat", *demo, "--lora", f"{lora}:0.6", "--dry-run")
    assert dry.code == 0 and "LoRA style x0.6 (kohya" in dry.out
    ok = cli("generate", "cat", *demo, "--seed", "1", "--lora", f"{lora}:0.6", "-o", tmp_path / "a.png")
    assert ok.code == 0, ok.err
    meta = read_metadata(tmp_path / "a.png")
    assert meta["parameters"].splitlines()[0] == "cat <lora:style:0.6>"
    assert "Lora hashes: \"style: " in meta["parameters"]
    assert meta["record"]["adapters"]["loras"][0]["name"] == "style"
    one_error(cli("generate", "cat", *demo, "--lora", f"{lora}:strong"), "not a number")
    one_error(cli("generate", "cat", *demo, "--lora", tmp_path / "none.safetensors"), "not found")
    one_error(cli("generate", "cat", *demo, "--lora", xl), "cross-attention")
    (tmp_path / "bad.safetensors").write_text("x")
    one_error(cli("generate", "cat", *demo, "--lora", tmp_path / "bad.safetensors"), "not a readable")
