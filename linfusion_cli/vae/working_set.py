"""Bytes the tiled VAE's exact mode holds paused, from the VAE's config alone: the planner picks
the mode (exact or estimated statistics) before any VAE is built, and tiled.py checks the same
figure against the host budget (may exact mode run?) and the device budget (must its paused
tiles leave the device?); tests hold it equal to the modules'."""

from __future__ import annotations

from ..figures import DECODER_CONTEXT, ENCODER_CONTEXT
from .tiles import rank_tiles, window_area_sum


def _blocks(config: dict, decoder: bool) -> list[tuple[list[tuple[int, int]], bool]]:
    """Per block of diffusers' Encoder/Decoder: [(resnet in, out channels)], resamples?"""
    channels = list(config["block_out_channels"])
    order = channels[::-1] if decoder else channels
    layers = config.get("layers_per_block", 2) + (1 if decoder else 0)
    blocks, out = [], order[0]
    for i, width in enumerate(order):
        first, out = out, width
        resnets = [(first if j == 0 else out, out) for j in range(layers)]
        blocks.append((resnets, i < len(order) - 1))  # every block but the last resamples
    return blocks


def peak_elements_per_px(config: dict, decoder: bool) -> int:
    """Elements a tile holds at its worst GroupNorm per latent px of its window,
    max over GroupNorms of (C_in + C_out) x (resolution / latent resolution)^2: what one paused
    tile parks (vae/parking.py sizes its host buffer with it)."""
    f = 2 ** (len(config["block_out_channels"]) - 1)  # image px per latent px
    blocks = _blocks(config, decoder)
    if decoder:  # the first upsampling block's resnets run whole; the tiled path starts after it
        split = next(i for i, (_, up) in enumerate(blocks) if up)
        tiled, scale, step = blocks[split + 1:], 2, (lambda s: s * 2)
        tail = config["block_out_channels"][0]  # conv_norm_out's channels
    else:  # blocks up to the last downsampling one run tiled
        split = max(i for i, (_, down) in enumerate(blocks) if down)
        tiled, scale, step, tail = blocks[:split + 1], f, (lambda s: s // 2), 0
    best = 0
    for resnets, resamples in tiled:
        for c_in, c_out in resnets:
            best = max(best, (c_in + c_out) * scale * scale)
        if resamples:
            scale = step(scale)
    return max(best, tail * scale * scale)


def exact_working_set(config: dict, *, width: int, height: int, tile_px: int, decoder: bool,
                      itemsize: int, context: int | None = None, ranks: int = 1) -> int:
    """Bytes parked at the worst GroupNorm of the tiled path over a width x height image
    (tiled._working_set's figure): (C_in + C_out) x the windows' area at that resolution; with
    `ranks` processes sharing the tiles (vae/tiles.py rank_tiles), the busiest rank's."""
    f = 2 ** (len(config["block_out_channels"]) - 1)  # image px per latent px
    lh, lw = height // f, width // f
    if context is None:
        context = DECODER_CONTEXT if decoder else ENCODER_CONTEXT
    shares = rank_tiles(lh, lw, max(1, tile_px // f), context, ranks)
    return peak_elements_per_px(config, decoder) * max(map(window_area_sum, shares)) * itemsize
