"""Adapter keys in a preset: same image as the flags, flags override, bad values are one line."""

from __future__ import annotations

import pytest
import torch

from linfusion_cli.errors import PresetError
from ..adapter_helpers import save_tiny_lora
from linfusion_cli.planning.preset_keys import adapter_keys
from linfusion_cli.planning.presets import parse_preset

from ..cli_helpers import one_error, pixels, TINY_PRESET, write_preset


DEMO = ("--steps", "2", "--res", "64", "--seed", "1")


@pytest.fixture
def lora(tmp_path):
    """A kohya LoRA for the demo SD1.5 UNet, in a folder of its own beside the preset."""
    from diffusers import UNet2DConditionModel

    from linfusion_cli.models.tiny import DEMO_UNET_CONFIGS

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**DEMO_UNET_CONFIGS["sd15"])
    return save_tiny_lora(tmp_path / "presets" / "loras" / "style.safetensors", unet, "kohya")


def test_preset_lora_gives_the_flag_image_and_the_flag_overrides(cli, tmp_path, lora):
    """`lora: loras/style.safetensors:0.6` (relative to the preset's folder) is --lora FILE:0.6."""
    preset = write_preset(tmp_path / "presets" / "styled.yaml",
                          TINY_PRESET + "lora: loras/style.safetensors:0.6\n")
    plain = write_preset(tmp_path / "presets" / "plain.yaml")
    by_preset = cli("generate", "cat", "--preset", preset, *DEMO, "-o", tmp_path / "p.png")
    by_flag = cli("generate", "cat", "--preset", plain, *DEMO, "--lora", f"{lora}:0.6",
                  "-o", tmp_path / "f.png")
    without = cli("generate", "cat", "--preset", plain, *DEMO, "-o", tmp_path / "n.png")
    overridden = cli("generate", "cat", "--preset", preset, *DEMO, "--lora", f"{lora}:0",
                     "-o", tmp_path / "o.png")
    for r in (by_preset, by_flag, without, overridden):
        assert r.code == 0, r.err
    assert (pixels(tmp_path / "p.png") == pixels(tmp_path / "f.png")).all()
    assert (pixels(tmp_path / "p.png") != pixels(tmp_path / "n.png")).any()
    assert (pixels(tmp_path / "o.png") == pixels(tmp_path / "n.png")).all()  # --lora w 0 won
    dry = cli("generate", "cat", "--preset", preset, *DEMO, "--dry-run")
    assert dry.code == 0 and f"LoRA style x0.6 (kohya: {lora})" in dry.out, dry.out


@pytest.mark.parametrize("line, needles", [
    ("control_scale: strong", ["key 'control_scale'", "finite number"]),
    ("ip_scale: .nan", ["key 'ip_scale'", "finite number"]),
    ("lora: [1, 2]", ["key 'lora'"]),
    ("controlnet: 3", ["key 'controlnet'"]),
    ("lora: loras/missing.safetensors", ["key 'lora'", "not found"]),
    ("lora: loras/style.safetensors:strong", ["key 'lora'", "not a number"]),
    ("controlnet: ./nocn", ["key 'controlnet'", "--control-image"]),
    ("tile_scale: 0.5", ["key 'tile_scale'", "--tile-controlnet"]),
])
def test_bad_adapter_key_in_a_preset_is_one_line_exit_2(cli, tmp_path, lora, line, needles,
                                                        monkeypatch):
    """Caught when the plan is made, before any model loads."""
    from linfusion_cli.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    preset = write_preset(tmp_path / "presets" / "bad.yaml", TINY_PRESET + line + "\n")
    result = cli("generate", "cat", "--preset", preset, *DEMO, "-o", tmp_path / "x.png")
    one_error(result, str(preset), *needles)
    assert not (tmp_path / "x.png").exists()


def test_preset_adapter_paths(tmp_path):
    """Relative paths that exist beside the preset (or start with ./) are taken from its folder;
    hub ids, absolute paths and bundled presets' values stay as written."""
    (tmp_path / "cn").mkdir()
    text = "controlnet: cn\ncontrol_image: ./edges.png\ntile_controlnet: owner/tile\nip_scale: 1\n"
    preset = parse_preset(text, name="p", source=str(tmp_path / "p.yaml"))
    assert adapter_keys(preset) == {"controlnet": str(tmp_path / "cn"),
                                    "control_image": str(tmp_path / "edges.png"),
                                    "tile_controlnet": "owner/tile", "ip_scale": 1.0}
    assert adapter_keys(parse_preset("controlnet: cn\n", name="b", source="bundled:b")) == \
        {"controlnet": "cn"}
    with pytest.raises(PresetError, match="unknown key 'loras'"):
        parse_preset("loras: x\n", name="p", source="p.yaml")
