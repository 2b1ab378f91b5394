"""ControlNetModel.forward band by band: the UNet's down and middle path (unet.down_and_mid) with
each residual made from its skip as soon as the skip is finished, so the skips are never kept,
and each residual parked on the host at once under skips_on_cpu (rows laid out so that the
UNet, which adds it to its skip as it parks that, reads each band in one copy)."""

from __future__ import annotations

import torch
from torch import nn

from ..runtime.staging import Staging
from . import layers
from .rows import Full, band_ranges, conv_rows, whole_levels
from .unet_forward import comms, down_and_mid


def check_controlnet(net: nn.Module) -> None:
    """Refuse ControlNets the band-wise forward does not reproduce, before running."""
    if net.config.global_pool_conditions:
        raise ValueError("band-wise ControlNet: global_pool_conditions is not supported")
    for blk in list(net.down_blocks) + [net.mid_block]:
        for r in blk.resnets:
            layers.check_resnet(r)
        for tr in getattr(blk, "attentions", None) or ():
            layers.check_transformer(tr)


def _embedding(net, sample, timestep, timestep_cond, class_labels, added_cond_kwargs,
               encoder_hidden_states):
    """The time embedding, as diffusers' ControlNetModel.forward makes it."""
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        dtype = torch.float64 if isinstance(timestep, float) else torch.int64
        timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
    elif len(timesteps.shape) == 0:
        timesteps = timesteps[None].to(sample.device)
    timesteps = timesteps.expand(sample.shape[0])
    emb = net.time_embedding(net.time_proj(timesteps).to(dtype=sample.dtype), timestep_cond)
    if net.class_embedding is not None:
        if class_labels is None:
            raise ValueError("class_labels should be provided when num_class_embeds > 0")
        if net.config.class_embed_type == "timestep":
            class_labels = net.time_proj(class_labels)
        emb = emb + net.class_embedding(class_labels).to(dtype=net.dtype)
    kind = net.config.addition_embed_type
    if kind == "text":
        emb = emb + net.add_embedding(encoder_hidden_states)
    elif kind == "text_time":
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        time_embeds = net.add_time_proj(time_ids.flatten()).reshape((text_embeds.shape[0], -1))
        add_embeds = torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype)
        emb = emb + net.add_embedding(add_embeds)
    return emb


def banded_controlnet_forward(net: nn.Module, band_rows: int | None, park: bool, sample: torch.Tensor,
                              timestep, encoder_hidden_states: torch.Tensor,
                              controlnet_cond: torch.Tensor, conditioning_scale: float = 1.0,
                              class_labels=None, timestep_cond=None, attention_mask=None,
                              added_cond_kwargs=None, cross_attention_kwargs=None,
                              guess_mode: bool = False, return_dict: bool = True, group=None,
                              staging: Staging | None = None):
    """ControlNetModel.forward's arguments and result; residuals parked on the host if `park`
    (into `staging`'s buffers, which must not be pooled: the residuals leave this forward);
    band_rows as for bands.unet_forward.banded_forward (None: one band per level).

    group (linfusion_cli/parallel.BandGroup): this rank's rows of every residual, for the UNet
    run over the same group (the conditioning embedding runs whole on every rank, then sliced).
    """
    from diffusers.models.controlnets.controlnet import ControlNetOutput

    if attention_mask is not None:
        raise ValueError("band-wise ControlNet: attention masks are not supported")
    order = net.config.controlnet_conditioning_channel_order
    if order == "bgr":
        controlnet_cond = torch.flip(controlnet_cond, dims=[1])
    elif order != "rgb":
        raise ValueError(f"unknown `controlnet_conditioning_channel_order`: {order}")
    emb = _embedding(net, sample, timestep, timestep_cond, class_labels, added_cond_kwargs,
                     encoder_hidden_states)
    n_res = len(net.controlnet_down_blocks)
    if guess_mode:  # 0.1 .. 1.0 over the residuals, as diffusers does
        scales = torch.logspace(-1, 0, n_res + 1, device=sample.device) * conditioning_scale
    else:
        scales = [conditioning_scale] * (n_res + 1)
    residuals = []
    staging = staging if staging is not None else Staging(pooled=False)
    staging.begin()

    def on_skip(skip, rows):  # (B, C, h, w) -> its residual, made now so the skip need not be kept
        i = len(residuals)
        res = net.controlnet_down_blocks[i](skip) * scales[i]
        residuals.append(_parked(res, staging, rows) if park else res)
        del res

    comm, (r0, r1) = comms(group, net, sample.shape[2])

    def stem():  # (B, C0, r1 - r0, W): this rank's rows (all of them in one process)
        if group is None:
            return net.conv_in(sample) + net.controlnet_cond_embedding(controlnet_cond)
        cond = net.controlnet_cond_embedding(controlnet_cond)[:, :, r0:r1]
        return conv_rows(net.conv_in, Full(sample), r0, r1) + cond

    attn = (encoder_hidden_states, None, cross_attention_kwargs or {})
    h, _ = down_and_mid(net, stem, emb, attn, whole_levels(band_rows, sample.shape[2]), on_skip, comm)
    mid = net.controlnet_mid_block(h) * scales[-1]
    del h
    staging.settle()  # the caller may read the residuals on the host
    if not return_dict:
        return residuals, mid
    return ControlNetOutput(down_block_res_samples=residuals, mid_block_res_sample=mid)


def _parked(res: torch.Tensor, staging: Staging, rows: int) -> torch.Tensor:
    """res (B, C, H, W) in host memory, copied out band by band (no whole copy of it on the
    device); a (B, C, H, W) view of its (H, B, C, W) buffer."""
    assert not staging.pooled, "residuals leave the forward: their buffers cannot be pooled"
    out = staging.park(res.shape, res.dtype, res.device, like=res)
    for a, b in band_ranges(res.shape[2], rows):
        out.put(a, res[:, :, a:b])
    return out.view
