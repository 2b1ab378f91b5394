"""diffusers' UNet layers run band by band: the same maths as their forwards, one band of rows at
a time, so that only the layer's input and output span the whole map.

Each function mirrors one diffusers forward (named in its docstring) and refuses variants it
does not reproduce. Inputs are row sources (rows.py); outputs are whole device maps.
"""

from __future__ import annotations

import torch
from torch import nn

from .rows import (Computed, Full, Moments, Rows, Upsampled, band_ranges, conv_rows,
                   conv_window, group_norm_affine, mapped, normed, reduced)

# `comm` arguments: None in one process; under band parallelism (linfusion_cli/parallel) the
# level's communicator, whose halo(src, top, bottom) adds the neighbours' rows to this rank's
# band, moments(m) / key_state(state) sum over the ranks and tokens(n) is the whole map's count.


def halo_rows(conv: nn.Module, height: int) -> tuple[int, int]:
    """(rows above, rows below) a band of `height` input rows that conv's output rows
    [0, ceil(height / stride)) read (the rows a rank needs from its neighbours)."""
    base = getattr(conv, "base_layer", conv)
    (k, _), (s, _), (p, _), (d, _) = base.kernel_size, base.stride, base.padding, base.dilation
    out = -(-height // s)
    return p, max(0, (out - 1) * s - p + (k - 1) * d + 1 - height)


def check_resnet(r: nn.Module) -> None:
    """Refuse ResnetBlock2D variants whose forward `resnet` does not reproduce."""
    if getattr(r, "upsample", None) is not None or getattr(r, "downsample", None) is not None:
        raise ValueError("band-wise UNet: resnets that resample are not supported")
    norm = getattr(r, "time_embedding_norm", "default")
    # "group" (the VAE decoder's resnets, no temb): diffusers then runs the default path
    if norm != "default" and not (norm == "group" and r.time_emb_proj is None):
        raise ValueError("band-wise UNet: only the default time-embedding norm is supported")
    if getattr(r.conv1, "base_layer", r.conv1).stride[0] != 1:
        raise ValueError("band-wise UNet: resnet convs must have stride 1")


def resnet(r: nn.Module, x: Rows, temb: torch.Tensor | None, rows: int, comm=None,
           spare: torch.Tensor | None = None) -> torch.Tensor:
    """ResnetBlock2D.forward(x, temb) -> (B, C_out, H, W), holding x, one output map and a band.

    Pass 1: GroupNorm-1 moments of x (a parked skip's were taken before it left). Pass 2: conv1
    band by band into the output map, with the time embedding added and GroupNorm-2 moments
    taken; each band of x is read once with conv1's halo, and the next band's parked rows are
    asked for before this one computes. Pass 3: conv2 + shortcut, written over the output map
    in place; the rows above each band that conv2 still needs are kept aside (`carry`) before
    they are overwritten.

    spare: a whole map (B, >= C_out, H, W) of the shortcut's dtype that the caller is done with
    once x has been read (x's own left part, under skips_on_cpu). The shortcut is then taken in
    pass 2 from the band conv1 read, and kept in spare's rows that no later band reads, so that
    pass 3 reads no row of x: a parked skip crosses PCIe once per resnet, not twice.
    """
    check_resnet(r)
    ranges = band_ranges(x.height, rows)
    act = r.nonlinearity
    affine1 = group_norm_affine(r.norm1, x, ranges, comm)
    if temb is not None and r.time_emb_proj is not None:
        t = temb if r.skip_time_act else r.nonlinearity(temb)
        temb = r.time_emb_proj(t)[:, :, None, None]  # (B, C_out, 1, 1)
    else:
        temb = None
    xh = x if comm is None else comm.halo(x, *halo_rows(r.conv1, x.height))
    first, last = -xh.above, x.height + xh.below  # rows xh has (zeros beyond them)
    windows = [conv_window(r.conv1, a, b) for a, b in ranges]  # rows each band's conv1 reads
    early = _early_shortcut(r, spare, x)
    out, moments, waiting = None, Moments(), []  # waiting: (a, b, shortcut rows) not yet in spare
    xh.prefetch(*windows[0])
    for k, ((a, b), (lo, hi)) in enumerate(zip(ranges, windows)):
        lo, hi = max(lo, first), min(hi, last)
        xb = xh.rows(lo, hi)  # (B, C_in, hi - lo, W): the band and conv1's halo, read once
        later = windows[k + 1] if k + 1 < len(ranges) else None
        if later is not None:
            xh.prefetch(*later)  # the next band's parked rows cross while this band computes
        if early:  # rows above the next window are read no more: the shortcuts waiting go there
            waiting = _into_spare(spare, waiting, later[0] if later is not None else x.height)
        band = Computed(x.batch, x.channels, x.height, x.width,
                        lambda p, q, xb=xb, lo=lo: xb[:, :, p - lo:q - lo], xh.above, xh.below)
        h = conv_rows(r.conv1, mapped(band, lambda t: act(normed(t, affine1))), a, b)
        if temb is not None:
            h = h + temb
        if out is None:  # (B, C_out, H, W), the only whole map this block makes
            out = torch.empty(*h.shape[:2], x.height, x.width, dtype=h.dtype, device=h.device)
        out[:, :, a:b] = h
        moments.add(h)
        del h, band
        if early:  # (B, C_out, b - a, W) from the band's own rows
            waiting.append((a, b, r.conv_shortcut(xb[:, :, a - lo:b - lo].contiguous())))
        del xb
    if early:
        _into_spare(spare, waiting, x.height)
    del waiting
    affine2 = reduced(moments, comm).affine(r.norm2)
    conv2 = getattr(r.conv2, "base_layer", r.conv2)
    above = conv2.padding[0]  # rows above a band that conv2 reads (stride 1)
    carry, carry_at = out[:, :, :0].clone(), 0  # original rows [carry_at, a) of `out`
    # the neighbours' rows of conv1's output (B, C_out, t / u, W), taken before any is overwritten
    edge = None if comm is None else comm.halo(Full(out), *halo_rows(r.conv2, x.height))
    top, bottom = (out[:, :, :0], out[:, :, :0]) if edge is None else (edge.top, edge.bottom)

    def original(lo, hi, a):  # rows [lo, hi) of conv1's output, some already overwritten
        parts = []
        if lo < 0:
            parts.append(top[:, :, top.shape[2] + lo:top.shape[2] + min(hi, 0)])
        if lo < a and hi > 0:
            parts.append(carry[:, :, max(lo, 0) - carry_at:a - carry_at])
        if hi > a:
            parts.append(out[:, :, max(lo, a):min(hi, x.height)])
        if hi > x.height:
            parts.append(bottom[:, :, max(lo, x.height) - x.height:hi - x.height])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    for k, (a, b) in enumerate(ranges):
        if early:
            shortcut = spare[:, :out.shape[1], a:b]
        else:
            shortcut = x.rows(a, b)
            if k + 1 < len(ranges):
                x.prefetch(*ranges[k + 1])  # the next band's parked rows cross meanwhile
            if r.conv_shortcut is not None:
                shortcut = r.conv_shortcut(shortcut.contiguous())
        pre2 = Computed(out.shape[0], out.shape[1], x.height, x.width, lambda lo, hi, a=a:
                        r.dropout(act(normed(original(lo, hi, a), affine2))),
                        top.shape[2], bottom.shape[2])
        h = conv_rows(r.conv2, pre2, a, b)
        result = (shortcut + h) / r.output_scale_factor
        del h, shortcut
        keep = max(b - above, 0)
        carry, carry_at = original(keep, b, a).clone(), keep
        out[:, :, a:b] = result
        del result
    return out


def _early_shortcut(r: nn.Module, spare: torch.Tensor | None, x: Rows) -> bool:
    """Whether resnet can keep r's shortcut (a conv) in `spare` (see resnet)."""
    conv = r.conv_shortcut
    if spare is None or conv is None:
        return False
    base = getattr(conv, "base_layer", conv)
    return (spare.shape[1] >= base.out_channels and spare.dtype == base.weight.dtype
            and (spare.shape[0], spare.shape[2], spare.shape[3]) == (x.batch, x.height, x.width))


def _into_spare(spare: torch.Tensor, waiting: list, below: int) -> list:
    """Write the waiting shortcut bands (a, b, (B, C_out, b - a, W)) that end at or above row
    `below` into spare's first C_out channels; the others still wait."""
    left = []
    for a, b, s in waiting:
        if b <= below:
            spare[:, :s.shape[1], a:b] = s
        else:
            left.append((a, b, s))
    return left


def downsample(down: nn.Module, x: torch.Tensor, rows: int, comm=None) -> torch.Tensor:
    """Downsample2D.forward (a stride-2 conv with padding) -> (B, C, ceil(H/2), ceil(W/2))."""
    conv = down.conv
    if not getattr(down, "use_conv", True) or getattr(down, "norm", None) is not None \
            or getattr(down, "padding", 1) == 0:
        raise ValueError("band-wise UNet supports padded stride-2 conv downsamplers only")
    base = getattr(conv, "base_layer", conv)
    (k, _), (s, _), (p, _), (d, _) = base.kernel_size, base.stride, base.padding, base.dilation
    h_out = (x.shape[2] + 2 * p - d * (k - 1) - 1) // s + 1
    src: Rows = Full(x)
    if comm is not None:  # a rank's band: its output rows are the next level's band (aligned)
        h_out = -(-x.shape[2] // s)
        src = comm.halo(src, *halo_rows(conv, x.shape[2]))
    return made_whole(lambda a, b: conv_rows(conv, src, a, b), h_out, rows)


def upsample(up: nn.Module, x: "torch.Tensor | Rows", rows: int,
             size: tuple[int, int] | None = None) -> torch.Tensor:
    """Upsample2D.forward (nearest to `size`, default 2x, then its conv) -> (B, C, H', W'),
    made whole band by band, so that its conv runs once per output row.

    The next up block's first resnet reads this map three times (GroupNorm-1's moments, conv1
    with its halo rows, the shortcut): rows upsampled on request (rows.Upsampled) would rerun
    the conv on every read, +31% of the UNet's convolution FLOPs. Whole, it is one layer's
    output and the next one's input, as every other layer's is; x (a quarter of its size) is
    held beside it only while it is made. x may carry halo rows (a rank's band with its
    neighbours' rows, low_halo): only the band's own upsampled rows are made.
    """
    src = Upsampled(x, up, size)
    return made_whole(src.rows, src.height, rows)


def made_whole(band, height: int, rows: int) -> torch.Tensor:
    """band(a, b) (B, C, b - a, W) for every band of `rows` rows, written into one
    (B, C, height, W) map: the bands never all exist at once, as they would before a cat."""
    out = None
    for a, b in band_ranges(height, rows):
        h = band(a, b)
        if out is None:
            out = h.new_empty(*h.shape[:2], height, h.shape[3])
        out[:, :, a:b] = h
        del h
    return out


def check_transformer(tr: nn.Module) -> None:
    """Refuse Transformer2DModel / BasicTransformerBlock variants `transformer` does not reproduce."""
    if not getattr(tr, "is_input_continuous", False) or not isinstance(tr.norm, nn.GroupNorm):
        raise ValueError("band-wise UNet: continuous-input Transformer2DModel only")
    for blk in tr.transformer_blocks:
        if blk.norm_type != "layer_norm" or blk.pos_embed is not None or blk.only_cross_attention:
            raise ValueError("band-wise UNet: layer-norm transformer blocks only")
        if not hasattr(blk.attn1, "accumulate"):
            raise ValueError("band-wise UNet needs LinFusion self-attention (global softmax "
                             "attention does not decompose into bands)")


def transformer(tr: nn.Module, x: torch.Tensor, rows: int, context, context_mask,
                kwargs: dict, comm=None) -> torch.Tensor:
    """Transformer2DModel.forward(x) (continuous input) with its BasicTransformerBlocks; the
    result is written over x (the caller's own map), with one (B, H W, inner) token map beside it.
    """
    check_transformer(tr)
    B, C, H, W = x.shape
    ranges = band_ranges(H, rows)
    affine = group_norm_affine(tr.norm, Full(x), ranges, comm)
    linear = tr.use_linear_projection
    tokens = None
    for a, b in ranges:
        h = normed(x[:, :, a:b], affine)  # (B, C, h, W)
        if not linear:
            h = tr.proj_in(h).permute(0, 2, 3, 1)  # (B, h, W, inner), a view
        else:
            h = tr.proj_in(h.permute(0, 2, 3, 1).reshape(B, (b - a) * W, C))  # (B, n, inner)
        if tokens is None:
            tokens = torch.empty(B, H * W, h.shape[-1], dtype=h.dtype, device=h.device)
        tokens[:, a * W:b * W].view(h.shape).copy_(h)  # one copy, however h is laid out
        del h
    spans = [(a * W, b * W) for a, b in ranges]
    kwargs = dict(kwargs or {})
    kwargs.pop("gligen", None)
    for blk in tr.transformer_blocks:
        transformer_block(blk, tokens, spans, context, context_mask, kwargs, comm)
    inner = tokens.shape[2]
    for (a, b), (s, e) in zip(ranges, spans):
        h = tokens[:, s:e]
        if not linear:
            h = tr.proj_out(h.reshape(B, b - a, W, inner).permute(0, 3, 1, 2).contiguous())
        else:  # the projection per token, read back channel-first by the sum (no copy)
            h = tr.proj_out(h).view(B, b - a, W, -1).permute(0, 3, 1, 2)
        x[:, :, a:b].add_(h)  # (B, C, b - a, W): the residual, summed in place
        del h
    return x


def transformer_block(blk: nn.Module, tokens: torch.Tensor, spans, context, context_mask,
                      kwargs: dict, comm=None) -> None:
    """BasicTransformerBlock.forward over every span of tokens (B, N, inner), in place.

    LinFusion self-attention is global: pass 1 folds every span's keys into one state, pass 2
    runs the block per span with it (cross-attention, norms and feed-forward are per token).
    """
    state = blk.attn1.empty_state(tokens)
    n_total = tokens.shape[1] if comm is None else comm.tokens(tokens.shape[1])
    for s, e in spans:
        blk.attn1.accumulate(state, blk.norm1(tokens[:, s:e]), n_total)
    if comm is not None:  # every rank's tokens folded in: the whole image's state
        comm.key_state(state, n_total)
    for s, e in spans:
        h = tokens[:, s:e]
        h = blk.attn1.read(state, blk.norm1(h)) + h
        n = blk.norm2(h)
        h = blk.attn2(n, encoder_hidden_states=context, attention_mask=context_mask, **kwargs) + h
        n = blk.norm3(h)
        if blk._chunk_size is not None:
            raise ValueError("band-wise UNet: diffusers' feed-forward chunking is not supported "
                             "(use the ff_chunk knob)")
        torch.add(blk.ff(n), h, out=tokens[:, s:e])  # the sum straight into the token map
        del n, h


def head(norm: nn.Module | None, act: nn.Module | None, conv: nn.Module, x: torch.Tensor,
         rows: int, comm=None) -> torch.Tensor:
    """conv(act(norm(x))) (the UNet's conv_norm_out / conv_act / conv_out) band by band."""
    src: Rows = Full(x)
    if norm is not None:
        affine = group_norm_affine(norm, src, band_ranges(x.shape[2], rows), comm)
    if comm is not None:
        src = comm.halo(src, *halo_rows(conv, x.shape[2]))
    if norm is not None:
        src = mapped(src, lambda t: act(normed(t, affine)))
    parts = [conv_rows(conv, src, a, b) for a, b in band_ranges(x.shape[2], rows)]
    return torch.cat(parts, dim=2)
