"""The VAE's layers rewritten so a tile can pause at every GroupNorm and ask for statistics.

Tile paths are Python generators: at each GroupNorm they yield a `StatsRequest` (the tile's core
moments) and receive the `GroupStats` to normalise with. Everything between GroupNorms calls
the diffusers modules themselves (convs, Upsample2D, Downsample2D), so the maths is theirs.
Layers at latent resolution run once on the whole map ("whole" stages), with torch's own
GroupNorm, or with band_rows > 0 band by band (linfusion_cli.bands: same result, only a layer's
input and output map plus one band alive instead of ~6 maps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..bands import layers as bands
from ..bands.rows import Full, conv_rows
from .attention import mid_attention
from .norm import GroupStats, Moments, channel_moments, group_norm


@dataclass
class StatsRequest:
    """A tile paused before `norm`, offering the moments of its core."""

    norm: nn.GroupNorm
    moments: Moments


class TileCtx:
    """Where a tile's core lies in its window, and where its tensors wait while it is paused."""

    def __init__(self, crop: tuple[int, int, int, int], win_hw: tuple[int, int],
                 lot=None, key: int = 0):
        self.crop = crop  # (y0, y1, x0, x1) core inside the window, latent px
        self.win_hw = win_hw  # window (h, w) in latent px
        self.lot = lot  # a parking.Lot (exact mode over its device budget); None: stay put
        self.key = key  # this tile's name in the lot

    def core(self, x: torch.Tensor) -> tuple[slice, slice]:
        """The core of x (1, C, H, W), whose size is an integer multiple of the window's."""
        sy, sx = x.shape[-2] // self.win_hw[0], x.shape[-1] // self.win_hw[1]
        assert x.shape[-2] == sy * self.win_hw[0] and x.shape[-1] == sx * self.win_hw[1]
        y0, y1, x0, x1 = self.crop
        return slice(y0 * sy, y1 * sy), slice(x0 * sx, x1 * sx)

    def norm(self, norm: nn.GroupNorm, t: dict, src: str, dst: str):
        """Generator: t[dst] = norm(t[src]) with stats sent by the driver; t waits in the lot."""
        req = StatsRequest(norm, channel_moments(t[src], self.core(t[src])))
        if self.lot is not None:
            self.lot.pause(self.key, t)
        stats: GroupStats = yield req
        if self.lot is not None:
            self.lot.resume(self.key, t)
        t[dst] = group_norm(t[src], norm, stats)


def _check_resnet(r) -> None:
    """Refuse ResnetBlock2D variants whose forward this module does not reproduce."""
    if r.upsample is not None or r.downsample is not None or r.time_emb_proj is not None:
        raise ValueError("tiled VAE supports plain ResnetBlock2D (no up/down sampling, no temb)")
    if not isinstance(r.norm1, nn.GroupNorm) or not isinstance(r.norm2, nn.GroupNorm):
        raise ValueError("tiled VAE needs GroupNorm in ResnetBlock2D")


def resnet(r, t: dict, ctx: TileCtx):
    """Generator: diffusers ResnetBlock2D.forward(t['x'], temb=None), in place in t."""
    _check_resnet(r)
    yield from ctx.norm(r.norm1, t, "x", "h")
    t["h"] = r.conv1(r.nonlinearity(t["h"]))
    yield from ctx.norm(r.norm2, t, "h", "h")
    h = r.conv2(r.dropout(r.nonlinearity(t.pop("h"))))
    x = t.pop("x")
    if r.conv_shortcut is not None:
        x = r.conv_shortcut(x)
    t["x"] = (x + h) / r.output_scale_factor


def _mid_layers(mid) -> list[nn.Module]:
    """UNetMidBlock2D's layers in forward order: resnet, then (attention, resnet) pairs."""
    layers = [mid.resnets[0]]
    for attn, res in zip(mid.attentions, mid.resnets[1:]):
        layers += ([attn] if attn is not None else []) + [res]
    return layers


def _whole_layer(layer, x: torch.Tensor, token_limit: int, band_rows: int,
                 comm=None) -> tuple[torch.Tensor, bool]:
    """One latent-resolution layer (ResnetBlock2D with temb None, or the mid attention) on the
    whole map: torch's forward, or band by band (over ranks with a band-parallel comm, x then
    being this rank's band); returns (out, attention_was_exact)."""
    if not hasattr(layer, "conv1"):
        return mid_attention(layer, x, token_limit=token_limit, band_rows=band_rows, comm=comm)
    if band_rows <= 0 and comm is None:
        return layer(x, None), True
    _check_resnet(layer)
    return bands.resnet(layer, Full(x), None, band_rows or x.shape[2], comm), True


# ---------------------------------------------------------------- decoder
def decoder_split(dec) -> int:
    """Index of the first up block that upsamples: its resnets are the last whole-map layers."""
    if not isinstance(dec.conv_norm_out, nn.GroupNorm):
        raise ValueError("tiled VAE needs a GroupNorm conv_norm_out (no SpatialNorm)")
    for i, blk in enumerate(dec.up_blocks):
        if getattr(blk, "attentions", None):
            raise ValueError("tiled VAE does not support attention in VAE up blocks")
        if blk.upsamplers:
            return i
    raise ValueError("decoder never upsamples: nothing to tile")


def decoder_whole(vae, z: torch.Tensor, token_limit: int, band_rows: int = 0,
                  comm=None) -> tuple[torch.Tensor, bool]:
    """Latent-resolution part of the decode on the whole latent z (1, 4, h, w) -> (1, C, h, w);
    band by band (band_rows latent rows) when band_rows > 0. With a band-parallel comm (handed
    in by tiled.py) only this rank's rows [comm.a, comm.b) come out: (1, C, b - a, w)."""
    dec = vae.decoder
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)  # 4 -> 4 channels, 1x1: as is
    layers = _mid_layers(dec.mid_block)
    layers += [r for blk in dec.up_blocks[:decoder_split(dec) + 1] for r in blk.resnets]
    if comm is None:
        x = dec.conv_in(z)  # (1, C, h, w)
    else:  # every rank holds the whole (4-channel) latent: its band's conv rows need no message
        x = conv_rows(dec.conv_in, Full(z), comm.a, comm.b)  # (1, C, b - a, w)
    del z
    exact = True
    for layer in layers:
        x, ok = _whole_layer(layer, x, token_limit, band_rows, comm)
        exact = exact and ok
    return x, exact


def decoder_tile(vae, x: torch.Tensor, ctx: TileCtx):
    """Generator: the rest of the decode on one window (1, C, h, w) -> image (1, 3, 8h, 8w)."""
    dec = vae.decoder
    first = decoder_split(dec)
    t = {"x": x}
    del x
    for u in dec.up_blocks[first].upsamplers:
        t["x"] = u(t["x"])
    for blk in dec.up_blocks[first + 1:]:
        for r in blk.resnets:
            yield from resnet(r, t, ctx)
        for u in blk.upsamplers or ():
            t["x"] = u(t["x"])
    yield from ctx.norm(dec.conv_norm_out, t, "x", "x")
    return dec.conv_out(dec.conv_act(t.pop("x")))


# ---------------------------------------------------------------- encoder
def encoder_split(enc) -> int:
    """Index of the last down block that downsamples: blocks up to it run tiled."""
    last = -1
    for i, blk in enumerate(enc.down_blocks):
        if getattr(blk, "attentions", None):
            raise ValueError("tiled VAE does not support attention in VAE down blocks")
        if blk.downsamplers:
            last = i
    if last < 0:
        raise ValueError("encoder never downsamples: nothing to tile")
    return last


def encoder_tile(vae, x: torch.Tensor, ctx: TileCtx):
    """Generator: image window (1, 3, 8h, 8w) -> features at latent resolution (1, C, h, w)."""
    enc = vae.encoder
    t = {"x": enc.conv_in(x)}
    del x
    for blk in enc.down_blocks[:encoder_split(enc) + 1]:
        for r in blk.resnets:
            yield from resnet(r, t, ctx)
        for d in blk.downsamplers or ():
            t["x"] = d(t["x"])
    return t.pop("x")


def encoder_whole(vae, x: torch.Tensor, token_limit: int, band_rows: int = 0,
                  comm=None) -> tuple[torch.Tensor, bool]:
    """Latent-resolution rest of the encode on the whole map -> moments (1, 2*4, h, w); band by
    band when band_rows > 0; with a band-parallel comm, x and the moments are this rank's rows.
    Pass x without keeping a reference (tiled.py pops it from a dict):
    it can then be freed after the first layer. The layer loop runs here, in the one frame that
    holds the running map (a helper called with x would keep each input alive to its end)."""
    enc = vae.encoder
    layers = [r for blk in enc.down_blocks[encoder_split(enc) + 1:] for r in blk.resnets]
    exact = True
    for layer in layers + _mid_layers(enc.mid_block):
        x, ok = _whole_layer(layer, x, token_limit, band_rows, comm)
        exact = exact and ok
    if band_rows > 0 or comm is not None:  # (1, 2*4, h, w): small beside the input map
        x = bands.head(enc.conv_norm_out, enc.conv_act, enc.conv_out, x, band_rows or x.shape[2],
                       comm)
    else:
        x = enc.conv_out(enc.conv_act(enc.conv_norm_out(x)))
    if vae.quant_conv is not None:
        x = vae.quant_conv(x)
    return x, exact
