"""The planner's ControlNet step estimate against a live-bytes trace of the real step (meta device).

One denoising step as diffusers' ControlNet pipelines run it with our ControlNet preparation
(LinFusion on its attn1, the tiled cached conditioning embedding, the plan's knobs, its own CFG
split): controlnet(...) then unet(..., down_block_additional_residuals=...). The estimate
(adapters.memory.controlnet_step_bytes) must be within 5% for every knob combination the planner
can choose beside a ControlNet (skips_on_cpu is ruled out there), at 1024 px for SD1.5 and SD-XL.
"""

from __future__ import annotations

import itertools

import pytest

from linfusion_cli.adapters.memory import controlnet_config, controlnet_step_bytes
from linfusion_cli.adapters.trace import meta_controlnet, trace_controlnet_step
from linfusion_cli.memory.planner import ATTN_CHOICES, FF_CHOICES, MemoryPlan, load_family_configs
from linfusion_cli.memory.trace import meta_unet, trace_unet_bytes

SIZE = 1024
COMBOS = [MemoryPlan(ff_chunk=ff, cfg_split=cfg, attn_chunk=attn, inplace=inp)
          for ff, cfg, attn, inp in itertools.product(
              FF_CHOICES, (False, True), ATTN_CHOICES["cuda"], (False, True))]
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
    adapters = {k: {"source": "from-unet"} for k in kinds}
    estimated = controlnet_step_bytes(adapters, unet_config, width=size, height=size, img2img=True,
                                      guidance=True, dtype_bytes=2, knobs=knobs.knobs())
    return traced, estimated


@pytest.mark.slow
@pytest.mark.parametrize("kinds", ["one", "two"])
@pytest.mark.parametrize("knobs", COMBOS, ids=lambda k: (
    f"ff{k.ff_chunk}-cfg{int(k.cfg_split)}-attn{k.attn_chunk}-inp{int(k.inplace)}"))
def test_controlnet_step_estimate_within_5_percent_of_the_trace(family_models, knobs, kinds):
    traced, estimated = _compare(family_models, knobs, KINDS[kinds])
    assert abs(estimated / traced - 1) <= 0.05, (family_models[0], estimated, traced)


def test_controlnet_step_trace_sees_the_residuals(family_models):
    """Fast check: the step with a ControlNet holds more than the UNet alone, by at least the
    residual set, and the estimate follows it (512 px, the tightest knobs)."""
    from linfusion_cli.adapters.memory import residual_elements

    family, unet_config, unet, _, _ = family_models
    knobs = MemoryPlan(ff_chunk=4096, cfg_split=True, attn_chunk=4096, inplace=True)
    traced, estimated = _compare(family_models, knobs, ["controlnet"], size=512)
    plain = trace_unet_bytes(unet_config, width=512, height=512, knobs=knobs, unet=unet)
    assert traced - plain >= 2 * residual_elements(unet_config, 64, 64) * 2
    assert abs(estimated / traced - 1) <= 0.05, (family, estimated, traced)
