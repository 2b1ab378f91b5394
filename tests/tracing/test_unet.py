"""The planner's UNet estimate against a live-bytes trace of the real forward on the meta device.

For every knob combination the planner can choose on a GPU (feed-forward chunk, guidance split,
LinFusion chunk, in-place SiLU, skips on the CPU; offload and VAE tiles do not change the
UNet's activations), the estimate must be within 5% of what the real diffusers UNet with our
LinFusion layers and knobs keeps alive. SDPA (--no-linfusion) is left out: on the meta device
it takes the math path (an N x N tensor), not the flash/memory-efficient kernels a GPU runs.
"""

from __future__ import annotations

import pytest

from linfusion_cli.planning.memory import estimate as est
from linfusion_cli.planning.memory.planner import MemoryPlan, load_family_configs
from linfusion_cli.tracing.unet import LiveBytes, meta_unet, trace_unet_bytes

from ..grids import grid

SIZE = 1024  # px: 128^2 latent tokens at the top level, so every chunk choice below 16K acts


def test_live_bytes_counts_allocations_and_frees():
    import torch

    with torch.device("meta"):
        x = torch.empty(1024, 1024)  # 4 MiB, made before the mode: not counted
    with LiveBytes() as mode:
        y = x * 2
        z = y + 1
        del y
        view = z.view(-1)  # shares z's storage
        del z
    assert mode.peak == 2 * 4 * 2 ** 20 and mode.now == 4 * 2 ** 20
    del view


@pytest.fixture(scope="module", params=["sd15", "sd21", "sdxl"])
def family_unet(request):
    unet_config, _ = load_family_configs(request.param)
    return request.param, unet_config, meta_unet(unet_config, linfusion=True)


@pytest.mark.slow
@pytest.mark.parametrize("knobs", grid())
def test_estimate_within_5_percent_of_the_trace(family_unet, knobs):
    family, unet_config, unet = family_unet
    traced = trace_unet_bytes(unet_config, width=SIZE, height=SIZE, knobs=knobs, unet=unet)
    estimated = est.unet_activation_bytes(unet_config, latent_h=SIZE // 8, latent_w=SIZE // 8,
                                          batch=2, dtype_bytes=2, knobs=knobs.knobs())
    assert abs(estimated / traced - 1) <= 0.05, (family, estimated, traced)


@pytest.mark.slow  # a full-size meta trace or several runs: not the quick tier
def test_skips_on_cpu_trace_counts_less_device_memory(family_unet):
    """The trace sees the knob: parked skips are host memory, so the device peak drops."""
    _, unet_config, unet = family_unet
    plain = trace_unet_bytes(unet_config, width=512, height=512, knobs=MemoryPlan(attn_chunk=65536),
                             unet=unet)
    parked = trace_unet_bytes(unet_config, width=512, height=512, unet=unet,
                              knobs=MemoryPlan(attn_chunk=65536, skips_on_cpu=True))
    assert parked < plain
