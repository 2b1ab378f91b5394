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

from ..memory.trace import LiveBytes, _host_parking, _inputs, meta_unet


def meta_controlnet(config: dict, unet, dtype: torch.dtype = torch.float16):
    """A ControlNetModel of this config on the meta device, prepared as a run prepares it."""
    from diffusers import ControlNetModel

    from .controlnet import prepare_controlnet

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        net = ControlNetModel.from_config(config).to(dtype)
        return prepare_controlnet(net, unet)


@contextmanager
def _rows_repeat():
    """The pipeline's control batch is one image repeated for CFG (meta holds no values)."""
    from . import controlnet

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

    from ..memory.knobs import apply_knobs
    from .controlnet import _reset, controlnet_knobs

    unet = unet if unet is not None else meta_unet(unet_config, linfusion=True, dtype=dtype)
    nets = nets if nets is not None else [meta_controlnet(c, unet, dtype) for c in controlnet_configs]
    undo_unet = apply_knobs(unet, None, knobs)
    undo_nets = controlnet_knobs(nets, knobs)
    control = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
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
        _reset(nets)
        undo_nets()
        undo_unet()
