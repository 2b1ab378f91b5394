"""Single-file ControlNets (lllyasviel / A1111 `control_model.*` layout): same image as the folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from linfusion_cli.adapters import check_adapters
from linfusion_cli.planning.request import with_adapters
from linfusion_cli.models.loading import load_model
from linfusion_cli.models.tiny import UNET_CONFIGS
from ..adapter_helpers import save_tiny_controlnet
from linfusion_cli.pipeline import StageFinished, run_plan
from linfusion_cli.planning.plan import build_plan
from linfusion_cli.planning.request import Request

from ..cli_helpers import one_error, write_preset
from ..ldm_format import controlnet_to_ldm


@pytest.fixture(scope="module")
def files(tiny_pipeline_dirs, tmp_path_factory):
    """Per family: the ControlNet folder, the same weights as one file in the original layout
    ('ldm') and in diffusers keys ('flat'); a control image."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    root = tmp_path_factory.mktemp("cn_file")
    out = {}
    for family in ("sd15", "sdxl"):
        folder = save_tiny_controlnet(root / family, UNet2DConditionModel.from_pretrained(
            tiny_pipeline_dirs[family] / "unet"))
        net = ControlNetModel.from_pretrained(folder)
        ldm = root / f"{family}_ldm.safetensors"
        save_file({k: v.contiguous() for k, v in controlnet_to_ldm(net).items()}, str(ldm))
        flat = root / f"{family}_flat.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(flat))
        pth = root / f"{family}_ldm.pth"
        torch.save(controlnet_to_ldm(net), pth)
        out[family] = dict(folder=folder, ldm=ldm, flat=flat, pth=pth)
    image = (np.random.default_rng(1).random((48, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(root / "control.png")
    out["image"] = root / "control.png"
    return out


def run(folder, family, adapters):
    plan = build_plan(prompt="a lighthouse", negative="fog", width=128, height=96, native=64,
                      strengths=[0.5], steps=3, guidance=6.0, seed=3, scheduler="default",
                      model=str(folder), family=family, linfusion="fresh", vae_tile_px=0)
    plan = with_adapters(plan, check_adapters(Request(prompt="x", **adapters), dict(UNET_CONFIGS[family]), plan))
    model = load_model(str(folder), linfusion="fresh", channels_last=False, adapters=plan.adapters)
    stages = []
    run_plan(plan, model, on_event=lambda e: isinstance(e, StageFinished) and stages.append(e.image))
    return stages, plan


@pytest.mark.parametrize("family,layout", [("sd15", "ldm"), ("sdxl", "ldm"), ("sdxl", "flat")])
def test_single_file_gives_the_image_of_its_folder(tiny_pipeline_dirs, files, family, layout):
    """The original layout, and one file with diffusers keys (as xinsir's SD-XL ControlNets)."""
    from linfusion_cli.adapters.controlnet import controlnet_config

    f = files[family]
    image = str(files["image"])
    ours, plan = run(tiny_pipeline_dirs[family], family, dict(
        controlnet=str(f[layout]), control_image=image, tile_controlnet=str(f[layout]), tile_scale=0.7))
    ref, _ = run(tiny_pipeline_dirs[family], family, dict(
        controlnet=str(f["folder"]), control_image=image, tile_controlnet=str(f["folder"]), tile_scale=0.7))
    assert plan.adapters.controlnet.format == "safetensors"
    assert len(ours) == 2
    for k, (a, b) in enumerate(zip(ours, ref)):
        assert np.array_equal(a, b), f"stage {k}"
    derived = controlnet_config(str(f[layout]), dict(UNET_CONFIGS[family]))
    folder = controlnet_config(str(f["folder"]), dict(UNET_CONFIGS[family]))
    for key, value in derived.items():  # the planner's config is the folder's (the one that ran)
        assert folder[key] == (list(value) if isinstance(value, tuple) else value), key


def test_pickle_single_file_loads_only_when_allowed(tiny_pipeline_dirs, files):
    from diffusers import ControlNetModel, UNet2DConditionModel

    from linfusion_cli.adapters.controlnet import load_controlnet
    from linfusion_cli.errors import InputError

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dirs["sd15"] / "unet")
    with pytest.raises(InputError, match="--allow-pickle"):
        load_controlnet(str(files["sd15"]["pth"]), unet, "--controlnet")
    net = load_controlnet(str(files["sd15"]["pth"]), unet, "--controlnet", pickle_ok=True)
    want = ControlNetModel.from_pretrained(files["sd15"]["folder"]).state_dict()
    got = {k.replace("controlnet_cond_embedding.inner.", "controlnet_cond_embedding."): v
           for k, v in net.state_dict().items()}  # the tiled embedding wraps the original
    assert set(got) == set(want)
    assert all(torch.equal(got[k], v) for k, v in want.items())


def demo_files(root):
    """The files fixture's kinds for the tiny preset's (demo) UNets."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from linfusion_cli.models.tiny import DEMO_UNET_CONFIGS

    out = {}
    for family in ("sd15", "sdxl"):
        torch.manual_seed(0)
        net = ControlNetModel.from_pretrained(save_tiny_controlnet(
            root / family, UNet2DConditionModel(**DEMO_UNET_CONFIGS[family])))
        out[family] = dict(ldm=root / f"{family}.safetensors", flat=root / f"{family}_flat.safetensors",
                           pth=root / f"{family}.pth")
        save_file({k: v.contiguous() for k, v in controlnet_to_ldm(net).items()}, str(out[family]["ldm"]))
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out[family]["flat"]))
        torch.save(controlnet_to_ldm(net), out[family]["pth"])
    return out


def test_cli_single_file_checks_before_loading(cli, files, tmp_path, monkeypatch):
    from linfusion_cli.models import loading

    write_preset(tmp_path / "config" / "presets" / "tiny.yaml")
    image = files["image"]
    files = demo_files(tmp_path)
    ok = cli("generate", "cat", "--preset", "tiny", "--res", "128", "--controlnet", files["sd15"]["ldm"],
             "--control-image", image, "--tile-controlnet", files["sd15"]["ldm"], "--dry-run")
    assert ok.code == 0, ok.err
    assert f"ControlNet {files['sd15']['ldm']} x1" in ok.out

    from linfusion_cli.io.adapter_text import a1111_fields

    fields = a1111_fields({"controlnet": {"source": str(files["sd15"]["ldm"]), "format": "safetensors",
                                          "scale": 1.0}})
    assert fields["ControlNet 0"] == "Module: none, Model: sd15, Weight: 1"

    def no_loading(*a, **k):
        raise AssertionError("a model loaded")
    monkeypatch.setattr(loading, "open_pipeline", no_loading)
    demo = ("generate", "cat", "--preset", "tiny", "--res", "64", "--control-image", image)
    one_error(cli(*demo, "--controlnet", files["sdxl"]["ldm"]), "--controlnet", "cross-attention input 64")
    one_error(cli(*demo, "--controlnet", files["sdxl"]["flat"]), "--controlnet", "cross-attention")
    one_error(cli(*demo, "--controlnet", files["sd15"]["pth"]), "--allow-pickle")
    junk = tmp_path / "junk.safetensors"
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(4, 4)}, str(junk))
    one_error(cli(*demo, "--controlnet", junk), "not a ControlNet checkpoint")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    one_error(cli(*demo, "--controlnet", broken), "--controlnet", "broken.safetensors")
    pickled = cli("generate", "cat", "--preset", "tiny", "--res", "128", "--tile-controlnet",
                  files["sd15"]["pth"], "--allow-pickle", "--dry-run")
    assert pickled.code == 0, pickled.err


def test_single_file_for_other_block_channels_is_refused(tmp_path):
    from linfusion_cli.adapters.controlnet import check_controlnet
    from linfusion_cli.errors import CheckpointMismatchError
    from linfusion_cli.models.tiny import DEMO_UNET_CONFIGS

    demo = demo_files(tmp_path)["sd15"]["ldm"]  # the demo UNet's channels, same text width
    assert DEMO_UNET_CONFIGS["sd15"]["block_out_channels"] != UNET_CONFIGS["sd15"]["block_out_channels"]
    with pytest.raises(CheckpointMismatchError, match="block channels"):
        check_controlnet(str(demo), "--controlnet", dict(UNET_CONFIGS["sd15"]))
    assert check_controlnet(str(demo), "--controlnet", dict(DEMO_UNET_CONFIGS["sd15"])).format == "safetensors"
