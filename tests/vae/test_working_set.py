"""The planner's figure for the tiled VAE's exact-mode host memory (from the config) equals the
one the tiled VAE computes from its modules when it runs."""

from __future__ import annotations

import pytest
import torch

from linfusion_cli.models.tiny import DEMO_VAE_CONFIG
from linfusion_cli.planning.memory.planner import load_family_configs
from linfusion_cli.figures import DECODER_CONTEXT, ENCODER_CONTEXT
from linfusion_cli.vae.blocks import decoder_split, encoder_split
from linfusion_cli.vae.tiles import tile_grid, window_area_sum
from linfusion_cli.vae.working_set import exact_working_set


def _working_set(blocks, resnet_scale: int, step, tiles, itemsize: int, tail: int = 0) -> int:
    """The reference, read off the modules: bytes parked at the worst GroupNorm of the tiled path,
    (C_in + C_out) x the windows' area."""
    area, s, best = window_area_sum(tiles), resnet_scale, 0
    for blk in blocks:
        for r in blk.resnets:
            best = max(best, (r.conv1.in_channels + r.conv1.out_channels) * s * s * area)
        if blk.upsamplers if hasattr(blk, "upsamplers") else blk.downsamplers:
            s = step(s)
    return max(best, tail * s * s * area) * itemsize


def _meta_vae(config: dict):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL.from_config(config)


@pytest.mark.parametrize("which", ["sd15", "sdxl", "demo"])
@pytest.mark.parametrize("width, height, tile_px", [(2048, 1024, 512), (4096, 4096, 1024), (1000, 808, 256)])
def test_config_figure_equals_the_modules(which, width, height, tile_px):
    config = DEMO_VAE_CONFIG if which == "demo" else load_family_configs(which)[1]
    vae = _meta_vae(config)
    f = 2 ** (len(config["block_out_channels"]) - 1)
    lh, lw = height // f, width // f
    dec, enc = vae.decoder, vae.encoder
    dec_tiles = tile_grid(lh, lw, max(1, tile_px // f), DECODER_CONTEXT)
    enc_tiles = tile_grid(lh, lw, max(1, tile_px // f), ENCODER_CONTEXT)
    from_modules = {
        True: _working_set(dec.up_blocks[decoder_split(dec) + 1:], 2, lambda s: s * 2, dec_tiles,
                                 2, dec.conv_norm_out.num_channels),
        False: _working_set(enc.down_blocks[:encoder_split(enc) + 1], f, lambda s: s // 2,
                                  enc_tiles, 2),
    }
    for decoder, expected in from_modules.items():
        got = exact_working_set(config, width=width, height=height, tile_px=tile_px, decoder=decoder,
                                itemsize=2)
        assert got == expected > 0, (which, decoder)
