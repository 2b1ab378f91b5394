"""The library's front door (api.py) gives what the CLI gives, and works on a caller's pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from .cli_helpers import pixels, write_preset

DEMO = dict(model="demo", steps=2, seed=3, guidance=7.5, scheduler="ddim")


@pytest.fixture
def tiny_preset(cli_env, tmp_path):
    return str(write_preset(tmp_path / "tiny.yaml"))


def test_generate_equals_the_cli_file(cli, tmp_path, tiny_preset):
    from linfusion_cli import api

    image, record = api.generate("a red house", res=128, preset=tiny_preset, **DEMO)
    assert image.size == (128, 128) and record["seed"] == 3
    assert [(s["width"], s["height"]) for s in record["stages"]] == [(64, 64), (128, 128)]
    result = cli("generate", "a red house", "--res", "128", "--preset", tiny_preset, "--model", "demo",
                 "--steps", "2", "--seed", "3", "--guidance", "7.5", "--scheduler", "ddim",
                 "-o", "out.png", "-q")
    assert result.code == 0, result.err
    assert np.array_equal(np.asarray(image), pixels(tmp_path / "out.png"))


def test_a_callers_open_pipeline_gives_the_loaded_models_image(cli_env, tiny_preset):
    """pipe=: planned from the pipeline's own configs, prepared in place, same image as by name."""
    from diffusers import DiffusionPipeline

    from linfusion_cli import api
    from linfusion_cli.attention.module import LinFusionAttention
    from linfusion_cli.models.loading import demo_folder

    by_name, _ = api.generate("a boat", res=128, preset=tiny_preset, **DEMO)
    pipe = DiffusionPipeline.from_pretrained(str(demo_folder()), safety_checker=None,
                                             requires_safety_checker=False)
    plan = api.plan("a boat", res=128, preset=tiny_preset, pipe=pipe, **DEMO)
    assert plan.family_from == "the given pipeline's configs"
    mine, record = api.generate("a boat", res=128, preset=tiny_preset, pipe=pipe, **DEMO)
    assert any(isinstance(m, LinFusionAttention) for m in pipe.unet.modules())
    assert record["linfusion"] == "fresh"
    assert np.array_equal(np.asarray(mine), np.asarray(by_name))


def test_upscale_equals_the_cli_upscale(cli, tmp_path, tiny_preset):
    from PIL import Image

    from linfusion_cli import api

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    image, record = api.upscale(str(tmp_path / "in.png"), "stone", res=192, preset=tiny_preset, **DEMO)
    assert image.size == (192, 128) and all(s["strength"] is not None for s in record["stages"])
    result = cli("upscale", "in.png", "stone", "--res", "192", "--preset", tiny_preset, "--model", "demo",
                 "--steps", "2", "--seed", "3", "--guidance", "7.5", "--scheduler", "ddim",
                 "-o", "up.png", "-q")
    assert result.code == 0, result.err
    assert np.array_equal(np.asarray(image), pixels(tmp_path / "up.png"))
