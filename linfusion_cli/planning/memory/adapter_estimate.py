"""What ControlNets and an IP-Adapter add to a stage's device memory, for the planner.

Per stage with ControlNets (checked against a live-bytes trace of one denoising step on the meta
device, tracing/adapters.py, within 5%):
* weights of each ControlNet active in the stage (parameters x dtype bytes), always resident
  (controlnet_extra_bytes);
* the step's activation peak (controlnet_step_bytes), held inputs included: each control image
  as the pipeline prepares it, (B, 3, H, W) in the model dtype (B = 2 with guidance; its fp32
  form is on the host), and its cached conditioning embedding row (1, C0, H/8, W/8), both alive
  through the pipeline call (not the VAE phases, which run outside it). The ControlNet runs
  inside each UNet forward on that forward's rows (b = 1 per CFG half with cfg_split, else B)
  and its residuals are added to the skips in place after the middle block
  (adapters/residuals.py), so the moments are: the plain UNet walk; the UNet's down and middle
  path with this forward's residuals (b x one set); the ControlNet's own down/middle path (the
  UNet walk's); its zero convolutions and scaling (skips or zero-conv outputs, and the new set:
  2 b sets); with two ControlNets, diffusers' MultiControlNetModel holding the first net's set
  while the second runs, then both sets and their sum (3 b sets).
With band_rows and skips_on_cpu no whole residual set is on the device: the step is the larger
of the band-wise walks (the UNet's, its down path) and the embedding's tile, plus the held inputs.
The planner adds the step's excess over the plain UNet walk to the UNet activations (inside the
margin) and the weights to the stage apart.
"""

from __future__ import annotations

import torch
import json
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from ...adapters.file_checks import safetensors_shapes
from ...adapters.controlnet import EMBED_TILE_PX
from ...adapters.ip_adapter import _encoder_config
from .host import skip_elements
from .walk_bands import activation_bytes as unet_activation_bytes



@lru_cache(maxsize=8)
def _params(config_json: str) -> int:
    from diffusers import ControlNetModel

    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = ControlNetModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


def controlnet_params(config: dict) -> int:
    return _params(json.dumps(config, sort_keys=True))


def residual_elements(unet_config: dict, latent_h: int, latent_w: int) -> int:
    """Values per batch item of the residuals a ControlNet returns (down skips + middle)."""
    levels = len(unet_config["block_out_channels"]) - 1
    mid_h, mid_w = -(-latent_h // 2 ** levels), -(-latent_w // 2 ** levels)
    return skip_elements(unet_config, latent_h, latent_w) \
        + unet_config["block_out_channels"][-1] * mid_h * mid_w  # the middle block


def controlnet_extra_bytes(configs: list[dict], dtype_bytes: int) -> int:
    """Weights of the stage's ControlNets, by their configs (0 without any); the step's
    activations, held inputs included, are controlnet_unet_extra's."""
    return sum(controlnet_params(config) * dtype_bytes for config in configs)


def _held_bytes(config: dict, unet_config: dict, width: int, height: int, batch: int,
                dtype_bytes: int) -> int:
    """One ControlNet's control image (B, 3, H, W) and cached embedding row (1, C0, H/8, W/8)."""
    c0 = config.get("block_out_channels", unet_config["block_out_channels"])[0]
    return (batch * 3 * width * height + c0 * -(-height // 8) * -(-width // 8)) * dtype_bytes


def _embedding_tile_bytes(config: dict, width: int, height: int, dtype_bytes: int) -> int:
    """The conditioning embedding's peak on one tile (adapters.controlnet.TiledConditioningEmbedding:
    EMBED_TILE_PX tiles with a halo wider than its receptive field, one CFG row): its first conv's
    output and that output's activation, both at full pixel resolution."""
    channels = config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
    radius, stride = 1, 1  # conv_in (3x3); each block: a 3x3 conv, then a 3x3 stride-2 conv
    for _ in channels[1:]:
        radius, stride = radius + 2 * stride, stride * 2
    radius += stride  # conv_out (3x3)
    halo = -(-radius // stride) * stride
    tile = max(EMBED_TILE_PX // stride * stride, stride)
    if height > tile or width > tile:
        height, width = min(height, tile + 2 * halo), min(width, tile + 2 * halo)
    return 2 * channels[0] * height * width * dtype_bytes


def controlnet_step_bytes(configs: list[dict], unet_config: dict, *, width: int, height: int,
                          guidance: bool, dtype_bytes: int, knobs, linfusion: bool = True) -> int:
    """Peak activation bytes of one denoising step with the stage's ControlNets (their configs),
    their held inputs included (what tracing.adapters.trace_controlnet_step counts); 0 without any."""
    if not configs:
        return 0
    B, db = (2 if guidance else 1), dtype_bytes
    lh, lw = -(-height // 8), -(-width // 8)
    split = bool(knobs.cfg_split) and B == 2
    b = 1 if split else B  # rows of each UNet forward, and of the ControlNet run inside it
    held = sum(_held_bytes(c, unet_config, width, height, B, db) for c in configs)
    sets = b * residual_elements(unet_config, lh, lw) * db  # one forward's residual set
    walk = dict(latent_h=lh, latent_w=lw, batch=B, dtype_bytes=db, linfusion=linfusion)
    own = replace(knobs, skips_on_cpu=False, cfg_split=split)  # the ControlNet keeps its skips
    unet_knobs = replace(own, skips_on_cpu=bool(knobs.skips_on_cpu))
    plain = unet_activation_bytes(unet_config, knobs=unet_knobs, **walk)
    down = unet_activation_bytes(unet_config, knobs=unet_knobs, through_mid=True, **walk)
    controlnet = unet_activation_bytes(unet_config, knobs=own, through_mid=True, **walk)
    embedding = max(_embedding_tile_bytes(c, width, height, db) for c in configs)
    if knobs.band_rows and knobs.skips_on_cpu:
        # band-wise and parked: each residual goes to the host as its skip is made
        # (bands/controlnet_forward.py) and comes back band by band with that skip: no whole set on the device
        return max(plain, down, embedding) + held
    first = sets if len(configs) > 1 else 0  # MultiControlNet: the first net's set
    moments = [
        embedding,  # the first step embeds the control image, one tile at a time
        plain,  # the UNet's forward once the residuals are in its skips (or parked with them)
        down + (0 if knobs.skips_on_cpu else sets),  # down/middle path, residuals on the device
        controlnet + first,  # a ControlNet's down and middle path
        2 * sets + first,  # its zero convs and scaling: skips or zero-conv outputs + new set
        3 * sets if len(configs) > 1 else 0,  # MultiControlNet: set 1 + set 2 + their sum
    ]
    return max(moments) + held


def controlnet_unet_extra(configs: list[dict], unet_config: dict, *, width: int, height: int,
                          guidance: bool, dtype_bytes: int, linfusion: bool = True):
    """None without ControlNets, else knobs -> bytes the step adds to the plain UNet walk
    (controlnet_step_bytes less the walk)."""
    if not configs:
        return None
    batch = 2 if guidance else 1

    def extra(knobs) -> int:
        step = controlnet_step_bytes(configs, unet_config, width=width, height=height,
                                     guidance=guidance, dtype_bytes=dtype_bytes, knobs=knobs,
                                     linfusion=linfusion)
        plain = unet_activation_bytes(unet_config, latent_h=-(-height // 8),
                                      latent_w=-(-width // 8), batch=batch,
                                      dtype_bytes=dtype_bytes, knobs=knobs, linfusion=linfusion)
        return step - plain
    return extra


# image encoders of h94/IP-Adapter when no local config says otherwise: ViT-H/14, ViT-bigG/14
_ENCODER_PARAMS = {"sd15": 632_000_000, "sd21": 632_000_000, "sdxl": 1_845_000_000}
_ENCODER_PROJECTION = {"sd15": 1024, "sd21": 1024, "sdxl": 1280}


@lru_cache(maxsize=8)
def _encoder_params(config_json: str) -> int:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**json.loads(config_json)))
    return sum(p.numel() for p in model.parameters())


def ip_adapter_params(unet_config: dict, projection_dim: int, tokens: int = 4) -> int:
    """Parameters of a plain h94 IP-Adapter for this UNet: to_k_ip and to_v_ip (hidden x C) on
    every cross-attention, and the image projection (tokens x C, P) + bias + norm."""
    cross = unet_config["cross_attention_dim"]
    chans = list(unet_config["block_out_channels"])
    layers = unet_config.get("layers_per_block", 2)
    depth = unet_config.get("transformer_layers_per_block", 1)
    depth = [depth] * len(chans) if isinstance(depth, int) else list(depth)
    hidden = sum(layers * depth[i] * c for i, (c, t) in
                 enumerate(zip(chans, unet_config["down_block_types"])) if "CrossAttn" in t)
    up_depth = unet_config.get("reverse_transformer_layers_per_block") or depth[::-1]
    hidden += sum((layers + 1) * (d if isinstance(d, int) else d[0]) * c for c, d, t in
                  zip(chans[::-1], up_depth, unet_config["up_block_types"]) if "CrossAttn" in t)
    if "CrossAttn" in (unet_config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        hidden += depth[-1] * chans[-1]
    return 2 * cross * hidden + tokens * cross * (projection_dim + 1) + 2 * cross


def ip_adapter_extra_bytes(spec, family: str, dtype_bytes: int, unet_config: dict | None = None) -> int:
    """The image encoder's and the adapter's weights. Activations: with the adapter's image
    tokens the UNet's peak stays within 5% of the plain estimate (2.5% at worst, 1024 px), and
    the encoder's 224 px forward (about 10 MiB for ViT-H, before the denoising loop) is far
    below 5% of a stage (tests/tracing/test_adapters.py)."""
    if spec is None:  # the plan's IpAdapterSpec, if any
        return 0
    config = Path(spec.encoder or "/nonexistent") / "config.json"
    projection = _ENCODER_PROJECTION.get(family, _ENCODER_PROJECTION["sdxl"])
    if config.is_file():
        data = {k: v for k, v in _encoder_config(config.parent, "--ip-encoder").items() if not k.startswith("_")}
        data.pop("architectures", None)
        projection = data.get("projection_dim", projection)
        total = _encoder_params(json.dumps(data, sort_keys=True)) * dtype_bytes
    else:
        total = _ENCODER_PARAMS.get(family, _ENCODER_PARAMS["sdxl"]) * dtype_bytes
    source = Path(spec.source)
    if source.is_file():  # the file's own tensors

        total += sum(_numel(s) for s in safetensors_shapes(source, "--ip-adapter").values()) * dtype_bytes
    elif unet_config is not None:
        total += ip_adapter_params(unet_config, projection) * dtype_bytes
    return total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
