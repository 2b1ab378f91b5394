"""Host bytes the tiled VAE's exact mode parks, from the VAE's config alone: the planner picks
the mode (exact or estimated statistics) before any VAE is built, and tiled.py checks the same
figure against the modules it runs (tests hold the two equal)."""

from __future__ import annotations

from ..tuning import DECODER_CONTEXT, ENCODER_CONTEXT
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
    area, blocks = max(map(window_area_sum, shares)), _blocks(config, decoder)
    if decoder:  # the first upsampling block's resnets run whole; the tiled path starts after it
        split = next(i for i, (_, up) in enumerate(blocks) if up)
        tiled, scale, step, tail = blocks[split + 1:], 2, (lambda s: s * 2), config["block_out_channels"][0]
    else:  # blocks up to the last downsampling one run tiled
        split = max(i for i, (_, down) in enumerate(blocks) if down)
        tiled, scale, step, tail = blocks[:split + 1], f, (lambda s: s // 2), 0
    best = 0
    for resnets, resamples in tiled:
        for c_in, c_out in resnets:
            best = max(best, (c_in + c_out) * scale * scale * area)
        if resamples:
            scale = step(scale)
    return max(best, tail * scale * scale * area) * itemsize
