"""What ControlNets add to a stage's device memory, for the planner (an additive term).

Per stage, on top of the UNet/VAE estimate:
* weights of each ControlNet active in the stage (parameters x dtype bytes);
* its control image as the pipeline prepares it: (B, 3, H, W) in the model dtype (B = 2 with
  guidance) plus one fp32 copy while it is converted;
* the cached conditioning embedding: one (1, C0, H/8, W/8) copy (CFG shares it as a view),
  and one embedding tile's working set (EMBED_TILE_PX^2 at the widest embedding channel count);
* the residuals a ControlNet hands to the UNet, held through the UNet's forward: one tensor per
  UNet skip connection plus the middle block, (B, C, h, w) each; with two ControlNets the
  running sum and the current set (2x).
The ControlNet's own working activations are not added: it runs its down/middle path before the
UNet starts, over the same sizes, so its working set does not coincide with the UNet's peak.
"""

from __future__ import annotations

import inspect
import json
from functools import lru_cache
from pathlib import Path

from .controlnet import EMBED_TILE_PX

EMBED_CHANNELS = (16, 32, 96, 256)  # diffusers' default conditioning_embedding_out_channels


def controlnet_config(source: str, unet_config: dict) -> dict:
    """A local ControlNet's own config, else the ControlNet from_unet would make of this UNet."""
    file = Path(source).expanduser() / "config.json"
    if file.is_file():
        return json.loads(file.read_text())
    from diffusers import ControlNetModel

    keys = set(inspect.signature(ControlNetModel.__init__).parameters)
    return {k: v for k, v in unet_config.items() if k in keys and k != "in_channels"}


@lru_cache(maxsize=8)
def _params(config_json: str) -> int:
    import torch
    from diffusers import ControlNetModel

    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = ControlNetModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


def controlnet_params(config: dict) -> int:
    return _params(json.dumps(config, sort_keys=True))


def residual_elements(unet_config: dict, latent_h: int, latent_w: int) -> int:
    """Values per batch item of the residuals a ControlNet returns (down skips + middle)."""
    channels = list(unet_config["block_out_channels"])
    per_level = unet_config.get("layers_per_block", 2)
    h, w = latent_h, latent_w
    total = channels[0] * h * w  # conv_in's output
    for i, c in enumerate(channels):
        total += per_level * c * h * w
        if i < len(channels) - 1:
            h, w = -(-h // 2), -(-w // 2)
            total += c * h * w  # the downsampler's output
    return total + channels[-1] * h * w  # the middle block


def controlnet_extra_bytes(adapters: dict, unet_config: dict, *, width: int, height: int,
                           img2img: bool, guidance: bool, dtype_bytes: int) -> int:
    """Device bytes the stage's ControlNets add to the UNet/VAE estimate (0 without any)."""
    kinds = [k for k in ("controlnet", "tile_controlnet")
             if k in (adapters or {}) and (img2img or k == "controlnet")]
    if not kinds:
        return 0
    batch = 2 if guidance else 1
    lh, lw = height // 8, width // 8
    total = 0
    for kind in kinds:
        config = controlnet_config(adapters[kind]["source"], unet_config)
        embed = list(config.get("conditioning_embedding_out_channels") or EMBED_CHANNELS)
        c0 = config.get("block_out_channels", unet_config["block_out_channels"])[0]
        total += controlnet_params(config) * dtype_bytes
        total += batch * 3 * width * height * dtype_bytes + 3 * width * height * 4  # control image
        total += c0 * lh * lw * dtype_bytes  # cached embedding
        total += 2 * max(embed) * EMBED_TILE_PX ** 2 * dtype_bytes  # one tile's working set
    sets = 2 if len(kinds) > 1 else 1
    return total + sets * batch * residual_elements(unet_config, lh, lw) * dtype_bytes


# image encoders of h94/IP-Adapter when no local config says otherwise: ViT-H/14, ViT-bigG/14
_ENCODER_PARAMS = {"sd15": 632_000_000, "sd21": 632_000_000, "sdxl": 1_845_000_000}


@lru_cache(maxsize=8)
def _encoder_params(config_json: str) -> int:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**json.loads(config_json)))
    return sum(p.numel() for p in model.parameters())


def ip_adapter_extra_bytes(adapters: dict, family: str, dtype_bytes: int) -> int:
    """The image encoder's weights (its 224 px activations and the adapter are negligible)."""
    spec = (adapters or {}).get("ip_adapter")
    if spec is None:
        return 0
    config = Path(spec.get("encoder") or "/nonexistent") / "config.json"
    if config.is_file():
        data = {k: v for k, v in json.loads(config.read_text()).items() if not k.startswith("_")}
        data.pop("architectures", None)
        return _encoder_params(json.dumps(data, sort_keys=True)) * dtype_bytes
    return _ENCODER_PARAMS.get(family, _ENCODER_PARAMS["sdxl"]) * dtype_bytes
