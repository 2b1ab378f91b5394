"""One model resolution for planning and loading: family, configs and LinFusion weights come
from the model itself (demo names, local folders, single files, the HF cache, known ids)."""

from __future__ import annotations

import json

import pytest

from linfusion_cli.errors import CheckpointMismatchError, ModelNotFoundError, PlanError
from linfusion_cli.models.resolve import resolve_linfusion, resolve_model
from linfusion_cli.planning.memory.fit import add_memory_plans
from linfusion_cli.planning.request import Request, make_plan


def _fake_hf_cache(root, repo: str, unet: dict, vae: dict):
    """The Hugging Face cache layout: refs/main -> snapshots/<sha>/{unet,vae}/config.json."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    for part, config in (("unet", unet), ("vae", vae)):
        target = folder / "snapshots" / "abc123" / part
        target.mkdir(parents=True)
        (target / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("name,family", [("demo", "sd15"), ("demo-sd21", "sd21"), ("demo-sdxl", "sdxl")])
def test_demo_names(name, family):
    info = resolve_model(name)
    assert (info.family, info.family_from) == (family, "demo")
    assert resolve_linfusion("auto", info) == "fresh"


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_local_folder_family_from_its_configs(tiny_pipeline_dirs, family):
    info = resolve_model(str(tiny_pipeline_dirs[family]), fallback_family="sd15")
    assert info.family == family and info.family_from == "local folder's configs"
    assert info.unet_config == json.loads((tiny_pipeline_dirs[family] / "unet" / "config.json").read_text())


def test_known_hub_ids_offline():
    assert resolve_model("stabilityai/stable-diffusion-xl-base-1.0").family == "sdxl"
    assert resolve_model("stabilityai/stable-diffusion-2-1").family == "sd21"
    info = resolve_model("Lykon/dreamshaper-8")
    assert info.family == "sd15" and resolve_linfusion("auto", info) == "Yuanshi/LinFusion-1-5"


def test_hf_cache_configs_win(tmp_path, monkeypatch, tiny_pipeline_dirs):
    import huggingface_hub.constants as hf

    folder = tiny_pipeline_dirs["sdxl"]
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    _fake_hf_cache(tmp_path, "someone/my-xl-finetune", unet, vae)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    info = resolve_model("someone/my-xl-finetune", fallback_family="sd15")
    assert (info.family, info.family_from) == ("sdxl", "Hugging Face cache's configs")
    assert info.unet_config == unet


def test_unknown_hub_id_is_assumed_and_says_so(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    info = resolve_model("someone/unknown", fallback_family="sd21")
    assert info.assumed and info.family == "sd21" and "assumed sd21" in info.family_from


def test_single_file_family_from_tensor_names(tiny_pipeline_dirs, tmp_path):
    from diffusers import DiffusionPipeline

    from ..ldm_format import save_ldm_checkpoint

    pipe = DiffusionPipeline.from_pretrained(str(tiny_pipeline_dirs["sdxl"]))
    path = save_ldm_checkpoint(pipe, tmp_path / "xl.safetensors")
    info = resolve_model(str(path), fallback_family="sd15")
    assert info.family == "sdxl" and info.family_from == "single file's tensor names"
    with_config = resolve_model(str(path), config_dir=str(tiny_pipeline_dirs["sdxl"]))
    assert with_config.unet_config["block_out_channels"] == \
        json.loads((tiny_pipeline_dirs["sdxl"] / "unet" / "config.json").read_text())["block_out_channels"]


def test_bad_paths_are_one_line_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a diffusers model folder"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="not a folder, file or hub id"):
        resolve_model("./missing")


def test_auto_linfusion_for_an_unknown_architecture_fails_at_plan_time(tiny_pipeline_dirs):
    with pytest.raises(CheckpointMismatchError, match="--linfusion PATH"):
        make_plan(Request(prompt="x", model=str(tiny_pipeline_dirs["sd15"]), linfusion="auto"))


@pytest.mark.parametrize("model,preset,strengths", [
    ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", (0.32, 0.24, 0.16, 0.08)),
    ("stabilityai/stable-diffusion-2-1", "sd21", (0.4, 0.3, 0.2, 0.1)),
    ("demo-sdxl", "sdxl", (0.32, 0.24, 0.16, 0.08)),
])
def test_preset_follows_the_model_family(model, preset, strengths):
    plan = make_plan(Request(prompt="x", model=model, res=16384, dry_run=True))
    assert plan.preset == preset and plan.family == preset
    assert tuple(s.strength for s in plan.stages[1:]) == strengths[:len(plan.stages) - 1]


def test_given_preset_wins_over_the_family():
    plan = make_plan(Request(prompt="x", model="stabilityai/stable-diffusion-xl-base-1.0",
                             preset="sd15", res=4096))
    assert plan.family == "sdxl" and plan.preset == "sd15"
    assert plan.stages[1].strength == 0.4
    assert min(plan.stages[0].width, plan.stages[0].height) == 1024  # SD-XL's trained size


@pytest.mark.parametrize("family,model,size,base", [
    ("sd15", "Lykon/dreamshaper-8", (16384, 8192), (1024, 512)),  # the published recipe
    ("sd15", "Lykon/dreamshaper-8", (4096, 4096), (512, 512)),
    ("sd21", "stabilityai/stable-diffusion-2-1", (6144, 6144), (768, 768)),
    ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", (16384, 16384), (1024, 1024)),
    ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", (16384, 8192), (2048, 1024)),
])
def test_base_stage_short_side_is_the_trained_size(family, model, size, base):
    plan = make_plan(Request(prompt="x", model=model, width=size[0], height=size[1]))
    assert plan.family == family
    assert (plan.stages[0].width, plan.stages[0].height) == base
    assert (plan.width, plan.height) == size


def test_published_sd15_16k_recipe_exactly():
    plan = make_plan(Request(prompt="x", preset="sd15", width=16384, height=8192))
    assert [(s.width, s.height, s.strength) for s in plan.stages] == [
        (1024, 512, None), (2048, 1024, 0.4), (4096, 2048, 0.3), (8192, 4096, 0.2),
        (16384, 8192, 0.1)]


def test_load_refuses_a_model_of_another_family_than_planned(tiny_pipeline_dirs):
    from linfusion_cli.models.loading import load_model

    with pytest.raises(PlanError, match="plan was made for sd15"):
        load_model(str(tiny_pipeline_dirs["sdxl"]), linfusion=None, family="sd15")


def test_plan_and_load_agree_on_the_family(tiny_pipeline_dirs):
    from linfusion_cli.models.loading import load_model

    plan = add_memory_plans(make_plan(Request(prompt="x", model=str(tiny_pipeline_dirs["sd21"]),
                                         no_linfusion=True, res=128)))
    model = load_model(plan.model, linfusion=plan.linfusion, family=plan.family)
    assert model.family == plan.family == "sd21"
