"""LoRA, ControlNet and IP-Adapter files that do not fit are found from their headers at plan time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ..cli_helpers import DEMO, ip_adapter_case, no_load, one_error


@pytest.fixture(scope="module")
def demo_controlnet(tmp_path_factory):
    """A ControlNet folder that fits the demo model."""
    from diffusers import UNet2DConditionModel

    from linfusion_cli.models.tiny import DEMO_UNET_CONFIGS

    from ..adapter_helpers import save_tiny_controlnet

    unet = UNet2DConditionModel.from_config(dict(DEMO_UNET_CONFIGS["sd15"]))
    return save_tiny_controlnet(tmp_path_factory.mktemp("cn") / "cn", unet)


def _lora(t: Path, tensors: dict) -> list[str]:
    from safetensors.torch import save_file

    save_file(tensors, str(t / "l.safetensors"))
    return ["--lora", str(t / "l.safetensors")]


def _controlnet(t: Path, source: Path, change) -> list[str]:
    import shutil

    folder = t / "cn"
    shutil.copytree(source, folder)
    change(folder / "diffusion_pytorch_model.safetensors")
    return ["--controlnet", str(folder), "--control-image", str(t / "i.png")]


def _reshaped(file: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    tensors["conv_in.weight"] = torch.zeros(7, *tensors["conv_in.weight"].shape[1:])
    save_file(tensors, str(file))


def _pickled(file: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(str(file)), file.with_suffix(".bin"))
    file.unlink()


ATTN = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


MISFITS = {
    "lora-rank": (lambda t, cn: _lora(t, {f"{ATTN}.lora_A.weight": torch.zeros(2, 16),
                                          f"{ATTN}.lora_B.weight": torch.zeros(16, 3)}), "rank"),
    "lora-width": (lambda t, cn: _lora(t, {f"{ATTN}.lora_A.weight": torch.zeros(2, 999),
                                           f"{ATTN}.lora_B.weight": torch.zeros(999, 2)}), "does not fit"),
    "lora-dtype": (lambda t, cn: _lora(t, {f"{ATTN}.lora_A.weight": torch.zeros(2, 16, dtype=torch.int32),
                                           f"{ATTN}.lora_B.weight": torch.zeros(16, 2)}), "floating point"),
    "controlnet-no-weights": (lambda t, cn: _controlnet(t, cn, Path.unlink), "no weights"),
    "controlnet-truncated": (lambda t, cn: _controlnet(t, cn, lambda f: f.write_bytes(f.read_bytes()[:-999])),
                             "not a readable"),
    "controlnet-other-family": (lambda t, cn: _controlnet(t, cn, _reshaped), "do not fit"),
    "controlnet-pickle": (lambda t, cn: _controlnet(t, cn, _pickled), "--allow-pickle"),
    "ip-adapter-zero-tokens": (lambda t, cn: ip_adapter_case(t) and _zero_tokens(t), "no image tokens"),
    "linfusion-missing": (lambda t, cn: ["--linfusion", str(t / "nowhere")], "not found"),
}


def _zero_tokens(t: Path) -> list[str]:
    from safetensors.torch import save_file

    from linfusion_cli.models.tiny import DEMO_UNET_CONFIGS

    cross = DEMO_UNET_CONFIGS["sd15"]["cross_attention_dim"]
    save_file({"image_proj.proj.weight": torch.zeros(0, 32), "ip_adapter.1.to_k_ip.weight": torch.zeros(8, cross)},
              str(t / "ip.safetensors"))
    return ["--ip-adapter", str(t / "ip.safetensors"), "--ip-image", str(t / "i.png")]


@pytest.mark.parametrize("case", list(MISFITS))
def test_adapter_misfits_are_found_from_headers_at_plan_time(cli, tmp_path, monkeypatch, demo_controlnet, case):
    no_load(monkeypatch)
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "i.png")
    setup, needle = MISFITS[case]
    line = one_error(cli("generate", "x", *DEMO, "--res", "64", *setup(tmp_path, demo_controlnet),
                         "--dry-run"), needle)
    assert "weights_only=False" not in line and "weights_only` set to `False" not in line


def test_no_message_advises_the_unsafe_load():
    import pickle

    from linfusion_cli.adapters.file_checks import reason
    from linfusion_cli.cli.console import one_line_of

    exc = pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with `weights_only` "
                                 "set to `False` will likely succeed")
    for text in (reason(exc), one_line_of(exc)):
        assert "False" not in text and "unexpected" not in text
