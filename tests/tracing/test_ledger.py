"""The cost ledger: counts of the real forward on meta, their extrapolation in height, and the
bytes of a CPU run that forces parking against what runtime/transfer.py moved."""

from __future__ import annotations

import pytest
import torch

from linfusion_cli.planning.cost import Cost
from linfusion_cli.planning.memory.planner import MemoryPlan, load_family_configs
from linfusion_cli.runtime import transfer
from linfusion_cli.tracing.ledger import (UnetLedger, band_period, counting, extrapolated,
                                          unet_call_cost)
from linfusion_cli.pipeline.knobs import apply_knobs

from ..model_helpers import linfusion_unet, tiny_vae, unet_inputs


@pytest.fixture(scope="module")
def sd15_ledger():
    return UnetLedger(load_family_configs("sd15")[0], linfusion=True)


@pytest.fixture(scope="module")
def tiny_ledger():
    return UnetLedger(dict(linfusion_unet().config), linfusion=True, dtype=torch.float32)


@pytest.mark.parametrize("family, knobs, width", [
    ("sd15", MemoryPlan(attn_chunk=65536, band_rows=32, skips_on_cpu=True), 512),  # band-wise
    ("tiny", MemoryPlan(attn_chunk=64, ff_chunk=32, cfg_split=True), 64),  # whole map, chunked
], ids=["sd15-bands", "tiny-chunks"])
@pytest.mark.slow  # a full-size meta trace or several runs: not the quick tier
def test_extrapolated_count_equals_the_direct_count(sd15_ledger, tiny_ledger, family, knobs, width):
    ledger = sd15_ledger if family == "sd15" else tiny_ledger
    period = band_period(ledger.config, knobs, width)
    rows = 6 * period  # taller than 4P: extrapolated from 2P and 4P
    assert rows <= 256, "the direct count must stay a few seconds"
    direct = unet_call_cost(ledger._model(), width=width, height=rows * 8, knobs=knobs, batch=2,
                            dtype=ledger.dtype)
    assert ledger(width, rows * 8, knobs, 2) == direct
    assert direct.launches > 0 and direct.flops > 0


def test_extrapolation_is_affine_in_height():
    def count(rows):  # a fake count: 10 launches a row, 3 fixed, 7 FLOPs a row
        return Cost(flops=7 * rows, launches=3 + 10 * rows)
    assert extrapolated(count, 100, 8) == count(100)
    assert extrapolated(count, 20, 8) == count(20)  # direct below 4P


def test_the_ledger_is_cached_on_disk(tmp_path, sd15_ledger):
    knobs = MemoryPlan(attn_chunk=65536)
    first = UnetLedger(sd15_ledger.config, linfusion=True, cache=tmp_path)
    cost = first(256, 256, knobs, 1)
    again = UnetLedger(sd15_ledger.config, linfusion=True, cache=tmp_path)
    again._count = None  # a recount would fail: the value must come from the file
    assert again(256, 256, knobs, 1) == cost
    assert len(list(tmp_path.glob("*.json"))) == 1


@pytest.mark.slow  # a full-size meta trace or several runs: not the quick tier
def test_a_banded_step_costs_at_most_5_percent_more_flops_than_the_whole_map(sd15_ledger):
    whole = sd15_ledger(1024, 1024, MemoryPlan(attn_chunk=65536), 2)
    banded = sd15_ledger(1024, 1024, MemoryPlan(attn_chunk=65536, band_rows=32), 2)
    assert banded.flops <= 1.05 * whole.flops
    assert banded.conv_flops <= 1.05 * whole.conv_flops


def test_parked_bytes_of_a_cpu_run_equal_the_ledger_on_meta():
    """The band-wise UNet with skips parked, on the CPU with real tensors: what the one copy
    function moved equals what the ledger counts for the same config on the meta device."""
    unet = linfusion_unet()
    knobs = MemoryPlan(attn_chunk=4096, band_rows=8, skips_on_cpu=True)
    sample, t, context, kwargs = unet_inputs(unet, height=32, width=24)
    moved = []
    undo = apply_knobs(unet, None, knobs)
    try:
        with transfer.observed(lambda d, n, b: moved.append((d, n))), torch.inference_mode():
            unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=kwargs or None)
    finally:
        undo()
    h2d = sum(n for d, n in moved if d == "h2d")
    d2h = sum(n for d, n in moved if d == "d2h")
    assert d2h > 0 and h2d > 0
    ledger = UnetLedger(dict(unet.config), linfusion=True, dtype=torch.float32)
    meta = ledger(24 * 8, 32 * 8, knobs, 2)
    assert (meta.h2d_bytes, meta.d2h_bytes) == (h2d, d2h)
    with counting() as tally:  # and the CPU run's own ledger agrees
        undo = apply_knobs(unet, None, knobs)
        try:
            unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=kwargs or None)
        finally:
            undo()
    assert tally.cost().conv_flops == meta.conv_flops  # (its text context is shorter: conv only)


@pytest.mark.parametrize("decoder", [True, False], ids=["decode", "encode"])
def test_vae_bytes_of_a_cpu_run_that_parks_equal_the_ledger_on_meta(decoder):
    """The tiled VAE with every paused tile parked (device_budget 0) on the CPU: the bytes
    runtime/transfer.py moved equal the ledger's count on meta, less what only a GPU moves (the
    decoder's latent-resolution map and its windows, the pixels), computed from shapes here."""
    from linfusion_cli import vae as tiled
    from linfusion_cli.models.tiny import VAE_CONFIG
    from linfusion_cli.tracing.ledger import vae_pass_cost
    from linfusion_cli.vae.tiles import tile_grid

    vae = tiny_vae()
    h, w, tile_px, f = 40, 56, 128, 8  # latent px; 3 x 4 tiles of 16 latent px
    plan = dict(tile_px=tile_px, mode="exact", band_rows=0, device_budget=0, host_budget=1 << 40)
    moved = {"d2h": 0, "h2d": 0}
    with transfer.observed(lambda d, n, b: moved.__setitem__(d, moved[d] + n)):
        if decoder:
            tiled.decode(vae, torch.randn(1, 4, h, w), **plan)
        else:
            tiled.encode(vae, (torch.rand(h * f, w * f, 3) * 255).to(torch.uint8).numpy(), **plan)
    assert moved["d2h"] == moved["h2d"] > 0  # each parked tile comes back
    meta = vae_pass_cost(VAE_CONFIG, w * f, h * f, decoder=decoder, dtype=torch.float32, **plan)
    if decoder:
        c = VAE_CONFIG["block_out_channels"][-1]  # the latent-resolution map's channels
        windows = sum(t.window_area for t in tile_grid(h, w, tile_px // f, 11))
        gpu_only_d2h, gpu_only_h2d = c * h * w * 4 + 3 * h * w * f * f, c * windows * 4
    else:
        windows = sum(t.window_area for t in tile_grid(h, w, tile_px // f, 6))
        gpu_only_d2h, gpu_only_h2d = 0, 3 * windows * f * f * 4  # image windows in, float32
    assert meta.d2h_bytes == moved["d2h"] + gpu_only_d2h
    assert meta.h2d_bytes == moved["h2d"] + gpu_only_h2d
