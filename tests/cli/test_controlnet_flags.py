"""--controlnet and --tile-controlnet as a user types them: the dry run, the image's metadata and
one line for each bad input."""

from __future__ import annotations

import torch
from PIL import Image

from ..adapter_helpers import save_tiny_controlnet
from ..cli_helpers import one_error, write_preset


def test_cli_controlnet_dry_run_metadata_and_bad_input(cli, tmp_path):
    from diffusers import UNet2DConditionModel

    from linfusion_cli.models.tiny import DEMO_UNET_CONFIGS
    from linfusion_cli.io.metadata import read_metadata

    torch.manual_seed(0)
    cn = save_tiny_controlnet(tmp_path / "canny", UNet2DConditionModel(**DEMO_UNET_CONFIGS["sd15"]))
    xl = save_tiny_controlnet(tmp_path / "xl", UNet2DConditionModel(**DEMO_UNET_CONFIGS["sdxl"]))
    control = tmp_path / "edges.png"
    Image.new("RGB", (40, 40), (255, 255, 255)).save(control)
    write_preset(tmp_path / "config" / "presets" / "tiny.yaml")  # native 64: 128 px is two stages
    demo = ("--preset", "tiny", "--res", "64")
    two = ("--preset", "tiny", "--res", "128")
    args = ("--controlnet", cn, "--control-image", control, "--control-scale", "0.5", "--tile-controlnet", cn)
    dry = cli("generate", "cat", *two, *args, "--dry-run")
    assert dry.code == 0, dry.err
    assert "ControlNet " + str(cn) + " x0.5" in dry.out and "tile ControlNet" in dry.out
    ok = cli("generate", "cat", *two, "--seed", "1", *args, "-o", tmp_path / "a.png")
    assert ok.code == 0, ok.err
    meta = read_metadata(tmp_path / "a.png")
    assert 'ControlNet 0: "Module: none, Model: canny, Weight: 0.5"' in meta["parameters"]
    assert "ControlNet 1: \"Module: tile (each stage's input), Model: canny, Weight: 1\"" in meta["parameters"]
    assert meta["record"]["adapters"]["controlnet"]["image"] == str(control)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    one_error(cli("generate", "cat", *demo, "--controlnet", cn, "--control-image", broken), "--control-image")
    one_error(cli("generate", "cat", *demo, "--controlnet", cn, "--control-image", tmp_path / "no.png"), "not found")
    one_error(cli("generate", "cat", *demo, "--controlnet", tmp_path / "nocn", "--control-image", control), "not found")
    one_error(cli("generate", "cat", *demo, "--controlnet", xl, "--control-image", control), "cross-attention")
    one_error(cli("generate", "cat", *demo, "--controlnet", cn), "--control-image")
    one_error(cli("generate", "cat", *demo, "--tile-controlnet", cn), "img2img")
    one_error(cli("generate", "cat", *two, "--tile-controlnet", cn, "--tile-scale", "x"), "--tile-scale")
