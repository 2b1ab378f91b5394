"""UNet2DConditionModel.forward band by band (the `band_rows` memory knob).

The same computation as diffusers' forward (equal up to float summation order, see
tests/bands/), with every layer run band by band (layers.py): at any moment the device holds
the layer's input, its output, a band's working set and the skips (or none of them, parked on
the host with skips_on_cpu, coming back one band of rows at a time). An up block's input is
never concatenated whole: `Cat` hands its resnet the rows it asks. The upsampler's output is
made whole, band by band (layers.upsample), so that its conv runs once per row, except at full
resolution with parked skips (`upsampled`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..runtime.staging import Staging
from . import layers
from .rows import Cat, Full, Host, Rows, Upsampled, conv_rows, level_rows, low_halo, park, whole_levels


def levels(model: nn.Module) -> int:
    """How many times the down path halves the height (3 for SD1.5, 2 for SD-XL)."""
    return sum(1 for blk in model.down_blocks if blk.downsamplers)


def comms(group, model: nn.Module, height: int):
    """(level -> that level's communicator, or None in one process; this rank's rows at level 0).

    `group` (linfusion_cli/parallel's BandGroup, or None) is handed in, never imported: bands
    sit below parallel. Its layout gives each rank a contiguous band of rows at every level."""
    if group is None:
        return (lambda level: None), (0, height)
    layout = group.layout(height, levels(model))
    return layout.at, layout.rows(0)


def check_unet(unet: nn.Module) -> None:
    """Refuse UNets (or call options) the band-wise forward does not reproduce, before running."""
    cfg = unet.config
    if cfg.addition_embed_type == "image_hint" or getattr(unet, "position_net", None) is not None:
        raise ValueError("band-wise UNet: image-hint and GLIGEN UNets are not supported")
    for blk in list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks):
        for r in blk.resnets:
            layers.check_resnet(r)
        for tr in getattr(blk, "attentions", None) or ():
            layers.check_transformer(tr)
        if getattr(blk, "b1", None) is not None:
            raise ValueError("band-wise UNet: FreeU is not supported")


def _embeddings(unet, sample, timestep, encoder_hidden_states, class_labels, timestep_cond,
                added_cond_kwargs):
    """The time embedding and the cross-attention context, exactly as diffusers' forward makes them."""
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat \
            else emb + class_emb
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs)
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    context = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                                 added_cond_kwargs=added_cond_kwargs)
    return emb, context


def banded_forward(unet: nn.Module, band_rows: int | None, park_skips: bool, sample: torch.Tensor,
                   timestep, encoder_hidden_states: torch.Tensor, class_labels=None,
                   timestep_cond=None, attention_mask=None, cross_attention_kwargs=None,
                   added_cond_kwargs=None, down_block_additional_residuals=None,
                   mid_block_additional_residual=None, down_intrablock_additional_residuals=None,
                   encoder_attention_mask=None, return_dict: bool = True, control=None,
                   group=None, staging: Staging | None = None):
    """UNet2DConditionModel.forward's arguments and result; sample (B, 4, H, W).

    band_rows: latent rows per band at full resolution (halved per level, rounded up); None:
    one band per level (band parallelism with no band_rows: each rank's rows in one band).
    park_skips: skips (each with its ControlNet residual added) wait in host memory
    (skips_on_cpu), in `staging`'s buffers (runtime/staging.py: kept by the caller, reused by
    every forward; None: fresh ones for this forward).
    control: a callable (batch) -> (down residuals, mid residual) run once this forward's
    skips are needed (adapters/residuals.py), instead of residuals passed in.
    group: band parallelism (linfusion_cli/parallel.BandGroup): this rank computes its band of
    rows of every layer, and the whole output (B, 4, H, W) is gathered on every rank.
    """
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    if attention_mask is not None or down_intrablock_additional_residuals is not None:
        raise ValueError("band-wise UNet: attention masks and T2I-Adapter residuals are not supported")
    if encoder_attention_mask is not None:
        encoder_attention_mask = (1 - encoder_attention_mask.to(sample.dtype)) * -10000.0
        encoder_attention_mask = encoder_attention_mask.unsqueeze(1)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb, context = _embeddings(unet, sample, timestep, encoder_hidden_states, class_labels,
                               timestep_cond, added_cond_kwargs)
    band_rows = whole_levels(band_rows, sample.shape[2])
    device = sample.device
    up_factor = 2 ** unet.num_upsamplers
    odd_size = any(d % up_factor for d in sample.shape[-2:])
    attn = (context, encoder_attention_mask, cross_attention_kwargs or {})

    residuals, mid_residual = down_block_additional_residuals, mid_block_additional_residual
    if control is not None:  # the ControlNet for this forward's rows, before the UNet's own work
        residuals, mid_residual = control(sample.shape[0])
    comm, (r0, r1) = comms(group, unet, sample.shape[2])
    skips = []

    def stem():  # conv_in's output, this rank's rows (B, C0, r1 - r0, W): the sample is whole
        return unet.conv_in(sample) if group is None else conv_rows(unet.conv_in, Full(sample), r0, r1)

    if park_skips:
        staging = staging if staging is not None else Staging()
        staging.begin()  # the last forward's skips are all consumed

    def on_skip(t, rows):  # parked with its residual added: the moments must be of the sum
        i = len(skips)
        residual = residuals[i] if park_skips and i < len(residuals or ()) else None
        skips.append(_keep(t, park_skips, staging, rows, residual))

    h, level = down_and_mid(unet, stem, emb, attn, band_rows, on_skip, comm)
    if mid_residual is not None:
        h.add_(mid_residual.to(device))  # diffusers: sample + mid residual
    if not park_skips:  # parked skips have theirs already
        for skip, residual in zip(skips, residuals if residuals is not None else ()):
            skip.add_residual(residual)  # the down path is done with the skips: in place is safe
    del residuals, mid_residual
    sources, skips = skips, None  # the up path consumes them: no other reference may stay

    src: Rows = Full(h)
    del h
    for i, blk in enumerate(unet.up_blocks):
        rows = level_rows(band_rows, level)
        n = len(blk.resnets)
        mine, sources = sources[-n:], sources[:-n]
        for j, r in enumerate(blk.resnets):
            x = Cat(src, mine.pop())
            # a parked skip crosses once: the resnet keeps its shortcut in h, read by x alone
            spare = src.t if park_skips and isinstance(src, Full) else None
            del src  # held by x until the resnet is done with it
            h = layers.resnet(r, x, emb, rows, comm(level), spare)
            del x, spare
            if getattr(blk, "attentions", None):
                h = layers.transformer(blk.attentions[j], h, rows, *attn, comm(level))
            src = Full(h)
            del h
        if blk.upsamplers:
            size = (sources[-1].height, sources[-1].width) if odd_size and sources else None
            up = blk.upsamplers[0]  # with a halo, the rows at the band's edges can be made too
            low = src.t if group is None else comm(level).halo(src, *low_halo(up))
            del src  # the low-resolution map goes as soon as the upsampled one is made
            level -= 1
            src = upsampled(up, low, size, min(level_rows(band_rows, level), UPSAMPLE_ROWS),
                            whole=not (park_skips and level == 0))
            del low
    out = layers.head(unet.conv_norm_out, unet.conv_act, unet.conv_out, src.t,
                      level_rows(band_rows, 0), comm(0))
    if group is not None:  # (B, 4, H, W) on every rank: the scheduler and the caller see one map
        out = group.gather(out, comm(0))
    return UNet2DConditionOutput(sample=out) if return_dict else (out,)


# At most this many rows per band while an upsampler's output is made: the planner's largest
# band, so planned bands are as they are, and a rank's whole map under band parallelism with no
# band_rows (which would hold three such maps at once) is made in bands too
UPSAMPLE_ROWS = 256


def upsampled(up: nn.Module, low: "torch.Tensor | Rows", size, rows: int, whole: bool) -> Rows:
    """The upsampler's output as the next up block's first resnet reads it (three times: for
    GroupNorm-1's moments, conv1 with its halo, the shortcut).

    whole: made whole band by band (layers.upsample), its conv run once per row; the resnet
    then holds it beside its output. Otherwise its rows are computed on every read
    (rows.Upsampled): the conv runs three times, but only the low-resolution map (a quarter)
    is held. The caller asks for that with parked skips at full resolution only: there the
    upsampled map (2 C0 channels) and the resnet's output (C0) would be the largest pair of
    maps of the forward, above the two C0 maps every other full-resolution layer holds, and
    parked skips are the plan for a device that cannot take more (SD1.5 at 16384^2 in 12 GiB).
    """
    return Full(layers.upsample(up, low, rows, size)) if whole else Upsampled(low, up, size)


def down_and_mid(model: nn.Module, stem, emb, attn, band_rows: int, on_skip,
                 comm=lambda level: None):
    """The down blocks and the middle block band by band (a UNet's or a ControlNet's).

    stem() makes conv_in's output (B, C0, H, W) (called here so no caller holds it);
    on_skip(t, rows) is called with every skip as it is finished, conv_in's first, and the band
    rows of its level; comm(level) is the level's band-parallel communicator (None in one
    process). Returns (the middle block's output, its level)."""
    h = stem()
    on_skip(h, level_rows(band_rows, 0))
    level = 0
    for blk in model.down_blocks:
        rows = level_rows(band_rows, level)
        for i, r in enumerate(blk.resnets):
            h = layers.resnet(r, Full(h), emb, rows, comm(level))
            if getattr(blk, "attentions", None):
                h = layers.transformer(blk.attentions[i], h, rows, *attn, comm(level))
            on_skip(h, rows)
        for down in blk.downsamplers or ():
            level += 1
            h = layers.downsample(down, h, level_rows(band_rows, level), comm(level - 1))
            on_skip(h, level_rows(band_rows, level))
    rows = level_rows(band_rows, level)
    mid, c = model.mid_block, comm(level)
    h = layers.resnet(mid.resnets[0], Full(h), emb, rows, c)
    for tr, r in zip(getattr(mid, "attentions", None) or [None] * (len(mid.resnets) - 1),
                     mid.resnets[1:]):
        if tr is not None:
            h = layers.transformer(tr, h, rows, *attn, c)
        h = layers.resnet(r, Full(h), emb, rows, c)
    return h, level


def _keep(t: torch.Tensor, parked: bool, staging: Staging | None, rows: int,
          residual: torch.Tensor | None) -> "Full | Host":
    """A finished skip as the up path will read it: the device map, or (+ its residual) parked
    in host memory band by band, with its GroupNorm moments."""
    return park(t, staging, rows, residual) if parked else Full(t)
