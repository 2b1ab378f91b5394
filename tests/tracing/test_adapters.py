"""The planner's ControlNet step estimate against a live-bytes trace of the real step (meta device).

One denoising step as diffusers' ControlNet pipelines run it with our ControlNet preparation
(LinFusion on its attn1, the tiled cached conditioning embedding, the plan's knobs, residuals
made per UNet forward and added in place): controlnet(...) then unet(...,
down_block_additional_residuals=...). The estimate (planning.memory.adapter_estimate.controlnet_step_bytes) must be
within 5% for every knob combination the planner can choose (offload and VAE tiles aside), at
1024 px for SD1.5 and SD-XL, with one ControlNet, and with two for a few.

IP-Adapter: the UNet with diffusers' IP-Adapter processors (loaded by diffusers' own loader from
an h94-layout state dict on the meta device) stays within 5% of the plain UNet estimate for every
knob combination, and the image encoder's forward at 224 px is below 5% of the stage.
"""

from __future__ import annotations

import pytest

from linfusion_cli.adapters.controlnet import controlnet_config
from linfusion_cli.planning.memory.adapter_estimate import controlnet_step_bytes, ip_adapter_params
from linfusion_cli.tracing.adapters import (h94_meta_state_dict, meta_controlnet, meta_ip_unet, trace_controlnet_step, trace_image_encoder_bytes, trace_ip_unet_bytes)
from linfusion_cli.planning.memory import estimate as est
from linfusion_cli.planning.memory.planner import MemoryPlan, load_family_configs
from linfusion_cli.tracing.unet import meta_unet, trace_unet_bytes

from ..grids import grid, knob_id as ids

SIZE = 1024
TWO_COMBOS = [MemoryPlan(ff_chunk=ff, cfg_split=cfg, attn_chunk=4096, skips_on_cpu=sk)
              for ff, cfg, sk in [(0, False, False), (4096, True, False), (4096, True, True)]]
KINDS = {"one": ["controlnet"], "two": ["controlnet", "tile_controlnet"]}


@pytest.fixture(scope="module", params=["sd15", pytest.param("sdxl", marks=pytest.mark.slow)])
def family_models(request):
    unet_config, _ = load_family_configs(request.param)
    unet = meta_unet(unet_config, linfusion=True)
    config = controlnet_config("from-unet", unet_config)  # what ControlNetModel.from_unet makes
    return request.param, unet_config, unet, config, [meta_controlnet(config, unet) for _ in range(2)]


def _compare(family_models, knobs, kinds, size=SIZE):
    family, unet_config, unet, config, nets = family_models
    traced = trace_controlnet_step(unet_config, [config] * len(kinds), width=size, height=size,
                                   knobs=knobs, unet=unet, nets=nets[:len(kinds)])
    estimated = controlnet_step_bytes([config] * len(kinds), unet_config, width=size, height=size,
                                      guidance=True, dtype_bytes=2, knobs=knobs.knobs())
    return traced, estimated


@pytest.mark.slow
@pytest.mark.parametrize("knobs", grid())
def test_controlnet_step_estimate_within_5_percent_of_the_trace(family_models, knobs):
    traced, estimated = _compare(family_models, knobs, KINDS["one"])
    assert abs(estimated / traced - 1) <= 0.05, (family_models[0], estimated, traced)


@pytest.mark.slow
@pytest.mark.parametrize("knobs", TWO_COMBOS, ids=ids)
def test_two_controlnets_step_estimate_within_5_percent_of_the_trace(family_models, knobs):
    traced, estimated = _compare(family_models, knobs, KINDS["two"])
    assert abs(estimated / traced - 1) <= 0.05, (family_models[0], estimated, traced)


@pytest.mark.slow  # a full-size meta trace or several runs: not the quick tier
def test_controlnet_step_trace_and_estimate_at_512(family_models):
    """Fast check (512 px, tight knobs): the step with a ControlNet holds more than the UNet
    alone; the estimate follows the trace with and without parked skips."""
    family, unet_config, unet, _, _ = family_models
    for parked in (False, True):
        knobs = MemoryPlan(ff_chunk=4096, cfg_split=True, attn_chunk=4096, inplace=True,
                           skips_on_cpu=parked)
        traced, estimated = _compare(family_models, knobs, ["controlnet"], size=512)
        plain = trace_unet_bytes(unet_config, width=512, height=512, knobs=knobs, unet=unet)
        assert traced > plain
        assert abs(estimated / traced - 1) <= 0.05, (family, parked, estimated, traced)


# h94/IP-Adapter's image encoders (models/image_encoder: ViT-H/14; sdxl_models/image_encoder: bigG)
ENCODERS = {"sd15": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                         num_attention_heads=16, patch_size=14, image_size=224, projection_dim=1024),
            "sdxl": dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48,
                         num_attention_heads=16, patch_size=14, image_size=224, projection_dim=1280)}


@pytest.fixture(scope="module", params=["sd15", pytest.param("sdxl", marks=pytest.mark.slow)])
def ip_unet(request):
    unet_config, _ = load_family_configs(request.param)
    projection = ENCODERS[request.param]["projection_dim"]
    return request.param, unet_config, projection, meta_ip_unet(unet_config, projection)


def _ip_compare(ip_unet, knobs, size=SIZE):
    family, unet_config, projection, unet = ip_unet
    traced = trace_ip_unet_bytes(unet, width=size, height=size, knobs=knobs, projection_dim=projection)
    estimated = est.unet_activation_bytes(unet_config, latent_h=size // 8, latent_w=size // 8,
                                          batch=2, dtype_bytes=2, knobs=knobs.knobs())
    return traced, estimated


@pytest.mark.slow
@pytest.mark.parametrize("knobs", grid())
def test_ip_adapter_unet_within_5_percent_of_the_plain_estimate(ip_unet, knobs):
    traced, estimated = _ip_compare(ip_unet, knobs)
    assert abs(estimated / traced - 1) <= 0.05, (ip_unet[0], estimated, traced)


def test_ip_adapter_trace_runs_the_adapter_and_its_weights_are_counted(ip_unet):
    """The meta UNet runs diffusers' IP-Adapter processors (image tokens in every attn2), the
    estimate is within 5% at 512 px, and ip_adapter_params counts the h94 tensors exactly."""
    family, unet_config, projection, unet = ip_unet
    kinds = {type(p).__name__ for n, p in unet.attn_processors.items() if n.endswith("attn2.processor")}
    assert kinds == {"IPAdapterAttnProcessor2_0"}
    traced, estimated = _ip_compare(ip_unet, MemoryPlan(ff_chunk=4096, cfg_split=True,
                                                        attn_chunk=4096, inplace=True), size=512)
    assert abs(estimated / traced - 1) <= 0.05, (family, estimated, traced)
    tensors = h94_meta_state_dict(unet, projection)
    assert ip_adapter_params(unet_config, projection) == \
        sum(t.numel() for part in tensors.values() for t in part.values())


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_image_encoder_forward_is_below_5_percent_of_the_stage(family):
    """encode_image runs once per pipeline call, before the loop, on one 224 px image: its
    activations are far below 5% of the smallest stage the planner sizes (1024 px, tightest)."""
    unet_config, vae_config = load_family_configs(family)
    encoder = trace_image_encoder_bytes(ENCODERS[family])
    knobs = MemoryPlan(offload="sequential", vae_tile_px=512, ff_chunk=4096, cfg_split=True,
                       attn_chunk=4096, inplace=True, skips_on_cpu=True).knobs()
    stage = est.estimate_peak_bytes(unet_config, vae_config, width=SIZE, height=SIZE, knobs=knobs)
    assert 0 < encoder < 0.05 * stage, (family, encoder, stage)


@pytest.mark.parametrize("parked", [False, True])
@pytest.mark.slow  # a full-size meta trace or several runs: not the quick tier
def test_banded_controlnet_step_estimate_within_5_percent_of_the_trace(family_models, parked):
    """Band-wise with the ControlNet (bands/controlnet_forward.py): parked, each residual leaves the
    device as it is made, so the step is the larger of the band-wise walks and the embedding's
    tile, plus the held inputs."""
    knobs = MemoryPlan(attn_chunk=4096, cfg_split=True, band_rows=8, skips_on_cpu=parked)
    traced, estimated = _compare(family_models, knobs, ["controlnet"], size=768)
    assert abs(estimated / traced - 1) <= 0.05, (family_models[0], parked, estimated, traced)
