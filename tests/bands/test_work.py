"""The band-wise UNet does the whole-map forward's work: SD1.5's UNet (its shipped config, on the
meta device, LinFusion mounted) counted by torch's FlopCounterMode through tracing.ledger (the cost ledger)."""

from __future__ import annotations

import pytest

from linfusion_cli.planning.memory.planner import MemoryPlan, load_family_configs
from linfusion_cli.tracing.unet import meta_unet
from linfusion_cli.tracing.ledger import unet_call_cost as unet_work

PX = 1024  # latent 128 x 128, batch 2


@pytest.fixture(scope="module")
def sd15():
    unet = meta_unet(load_family_configs("sd15")[0], linfusion=True)
    return unet, unet_work(unet, width=PX, height=PX, knobs=MemoryPlan())


@pytest.mark.parametrize("rows", [32, 64])
def test_banded_flops_within_5_percent_of_the_whole_forward(sd15, rows):
    """Each upsampler's conv runs once per output row (blocks.upsample), not once per read."""
    unet, whole = sd15
    banded = unet_work(unet, width=PX, height=PX, knobs=MemoryPlan(band_rows=rows))
    assert 0 < whole.conv_flops < whole.flops
    assert banded.conv_flops <= 1.05 * whole.conv_flops, banded.conv_flops / whole.conv_flops
    assert banded.flops <= 1.05 * whole.flops, banded.flops / whole.flops


def test_parked_skips_recompute_only_the_full_resolution_upsampler(sd15):
    """With parked skips the last upsampler's output is not made whole (bands.unet_forward.upsampled):
    its conv runs for GroupNorm-1's moments, conv1 and the shortcut; the others' once."""
    unet, whole = sd15
    banded = unet_work(unet, width=PX, height=PX, knobs=MemoryPlan(band_rows=32, skips_on_cpu=True))
    conv = unet.up_blocks[-2].upsamplers[0].conv  # 640 -> 640, 3 x 3, at the latent's size
    (k, _), n = conv.kernel_size, PX // 8
    last = 2 * 2 * conv.in_channels * conv.out_channels * k * k * n * n  # FLOPs, batch 2
    extra = banded.conv_flops - whole.conv_flops
    assert extra <= 2.1 * last, extra / last  # two more passes, plus their halo rows


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.slow  # a full-size meta trace or several runs: not the quick tier
def test_band_parallel_ranks_share_the_whole_forwards_work(sd15, ranks):
    """Over a group every rank computes its own rows once (halos are sent, not recomputed):
    the ranks' FLOPs add up to within 5% of one process's, convolutions included."""
    unet, whole = sd15
    parts = [unet_work(unet, width=PX, height=PX, knobs=MemoryPlan(), world_size=ranks, rank=r)
             for r in range(ranks)]
    assert sum(p.conv_flops for p in parts) <= 1.05 * whole.conv_flops
    assert sum(p.flops for p in parts) <= 1.05 * whole.flops
    assert all(p.flops < 1.05 * whole.flops / ranks + 0.01 * whole.flops for p in parts)
    assert all(p.link_bytes > 0 and p.messages > 0 for p in parts)  # what they send is counted
