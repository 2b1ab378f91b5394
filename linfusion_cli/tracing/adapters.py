"""Live device bytes of one denoising step with ControlNets or an IP-Adapter, on the meta device.

The models are built from their configs on the meta device and prepared with the code a run
uses (adapters.controlnet.prepare_controlnet: LinFusion on the ControlNet's attn1, the tiled and
cached conditioning embedding; controlnet_knobs / apply_knobs: the plan's knobs; diffusers'
load_ip_adapter path for the IP-Adapter processors). The step is the two calls of diffusers'
ControlNet pipelines' loop, `controlnet(...)` then `unet(..., down_block_additional_residuals=,
mid_block_additional_residual=)`, run under memory.trace.LiveBytes. Counted: activations and the
inputs the planner counts (latents, text context, the CFG-repeated control image, the cached
embedding); not counted: weights (the planner adds them apart).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .unet import LiveBytes, _host_parking, _inputs, meta_unet
from ..adapters import controlnet, residuals
from ..adapters.controlnet import prepare_controlnet, _reset
from ..pipeline.controlnet_knobs import controlnet_knobs
from ..pipeline.knobs import apply_knobs


def meta_controlnet(config: dict, unet, dtype: torch.dtype = torch.float16):
    """A ControlNetModel of this config on the meta device, prepared as a run prepares it."""
    from diffusers import ControlNetModel

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        net = ControlNetModel.from_config(config).to(dtype)
        return prepare_controlnet(net, unet)


@contextmanager
def _rows_repeat():
    """The pipeline's control batch is one image repeated for CFG (meta holds no values)."""
    equal = controlnet._equal
    controlnet._equal = lambda a, b: True
    try:
        yield
    finally:
        controlnet._equal = equal


def trace_controlnet_step(unet_config: dict, controlnet_configs: list[dict], *, width: int,
                          height: int, knobs, batch: int = 2, dtype: torch.dtype = torch.float16,
                          unet=None, nets=None) -> int:
    """Peak live activation bytes of one denoising step with these ControlNets (first step:
    the conditioning embedding is computed there, then cached)."""
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    unet = unet if unet is not None else meta_unet(unet_config, linfusion=True, dtype=dtype)
    nets = nets if nets is not None else [meta_controlnet(c, unet, dtype) for c in controlnet_configs]
    undo_unet = apply_knobs(unet, None, knobs)
    undo_nets = controlnet_knobs(nets, knobs)
    control = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
    undo_residuals = (residuals.residuals_in_place(control, unet, undo_unet.in_effect)
                      if residuals.ENABLED else None)
    try:
        mode = LiveBytes()
        with torch.inference_mode(), mode, _host_parking(mode), _rows_repeat():
            sample, t, context, kwargs = _inputs(unet, batch, -(-height // 8), -(-width // 8), dtype)
            with torch.device("meta"):  # prepare_control_image: (1, 3, H, W) repeated for the batch
                images = [torch.cat([torch.empty(1, 3, height, width, dtype=dtype)] * batch)
                          for _ in nets]
            down, mid = control(sample, t, encoder_hidden_states=context,
                                controlnet_cond=images[0] if len(nets) == 1 else images,
                                conditioning_scale=1.0 if len(nets) == 1 else [1.0] * len(nets),
                                guess_mode=False, return_dict=False, **kwargs)
            out = unet(sample, t, encoder_hidden_states=context,
                       down_block_additional_residuals=down, mid_block_additional_residual=mid,
                       **kwargs).sample
            del out, down, mid
        return mode.peak
    finally:
        if undo_residuals is not None:
            undo_residuals()
        _reset(nets)
        undo_nets()
        undo_unet()


# ---------------------------------------------------------------- IP-Adapter

def h94_meta_state_dict(unet, projection_dim: int, tokens: int = 4,
                        dtype: torch.dtype = torch.float16) -> dict:
    """A plain IP-Adapter's tensors in the h94 layout, on the meta device, as diffusers'
    load_ip_adapter hands them to the UNet ({"image_proj": ..., "ip_adapter": ...}): image_proj
    proj (tokens x C, P) and norm (C); to_k_ip / to_v_ip (hidden, C) for the i-th cross-attention
    processor under key 2i + 1 (h94 numbered the original's attn1/attn2 pairs)."""
    cross = unet.config.cross_attention_dim
    with torch.device("meta"):
        proj = {"proj.weight": torch.empty(tokens * cross, projection_dim, dtype=dtype),
                "proj.bias": torch.empty(tokens * cross, dtype=dtype),
                "norm.weight": torch.empty(cross, dtype=dtype), "norm.bias": torch.empty(cross, dtype=dtype)}
        ip = {}
        names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
        for i, name in enumerate(names):
            hidden = unet.get_submodule(name.rsplit(".", 1)[0]).to_k.out_features
            for kind in ("to_k_ip", "to_v_ip"):
                ip[f"{2 * i + 1}.{kind}.weight"] = torch.empty(hidden, cross, dtype=dtype)
    return {"image_proj": proj, "ip_adapter": ip}


def meta_ip_unet(unet_config: dict, projection_dim: int, dtype: torch.dtype = torch.float16):
    """A meta UNet with LinFusion and an IP-Adapter loaded by diffusers' own loader (the
    `_load_ip_adapter_weights` that `load_ip_adapter` ends in)."""
    unet = meta_unet(unet_config, linfusion=True, dtype=dtype)
    with torch.device("meta"):
        unet._load_ip_adapter_weights([h94_meta_state_dict(unet, projection_dim, dtype=dtype)],
                                      low_cpu_mem_usage=False)
    return unet


def trace_ip_unet_bytes(unet, *, width: int, height: int, knobs, projection_dim: int,
                        batch: int = 2, dtype: torch.dtype = torch.float16) -> int:
    """Peak live activation bytes of one UNet forward with the IP-Adapter's image embeddings
    ((B, 1, P) per adapter, as the pipeline prepares them for CFG)."""
    undo = apply_knobs(unet, None, knobs)
    try:
        mode = LiveBytes()
        with torch.inference_mode(), mode, _host_parking(mode):
            sample, t, context, kwargs = _inputs(unet, batch, -(-height // 8), -(-width // 8), dtype)
            with torch.device("meta"):
                embeds = [torch.empty(batch, 1, projection_dim, dtype=dtype)]
            added = {**kwargs.pop("added_cond_kwargs", {}), "image_embeds": embeds}
            out = unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
            del out
        return mode.peak
    finally:
        undo()


def trace_image_encoder_bytes(encoder_config: dict, *, batch: int = 1,
                              dtype: torch.dtype = torch.float16) -> int:
    """Peak live activation bytes of the CLIP vision encoder on one image at its own size (224 px
    for h94's), its input included: the pipeline's encode_image before the denoising loop."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**encoder_config)).to(dtype).eval()
    size = encoder.config.image_size
    mode = LiveBytes()
    with torch.inference_mode(), mode:
        with torch.device("meta"):
            pixels = torch.empty(batch, 3, size, size, dtype=dtype)
        out = encoder(pixels).image_embeds
        del out
    return mode.peak
