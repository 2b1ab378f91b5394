"""A memory plan's knobs as a typed record (runtime/applied.py): a full plan with ControlNet
residuals on a tiny UNet plants no attribute on any module or forward, the record and the
read-back say what ran, the output is the plain one, and the undo leaves every module as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from linfusion_cli.adapters.residuals import residuals_in_place
from linfusion_cli.pipeline.controlnet_knobs import controlnet_knobs
from linfusion_cli.pipeline.knobs import apply_memory_plan, read_knobs
from linfusion_cli.planning.memory.planner import MemoryPlan
from linfusion_cli.runtime.applied import Bands, KnobsInEffect

from ..model_helpers import Pipe, linfusion_unet, module_state, tiny_vae, unet_inputs


@pytest.fixture(scope="module")
def models():
    from diffusers import ControlNetModel

    from linfusion_cli.adapters.controlnet import prepare_controlnet

    unet = linfusion_unet("sd15")
    torch.manual_seed(3)
    net = ControlNetModel.from_unet(type(unet).from_config(unet.config)).eval()
    for p in list(net.controlnet_down_blocks.parameters()) + list(net.controlnet_mid_block.parameters()):
        nn.init.normal_(p, std=0.1)
    return Pipe(unet, tiny_vae()), prepare_controlnet(net, unet)


PLANS = {  # every knob that once rode on a module: bands (parked skips in them), or hooks
    "banded": MemoryPlan(band_rows=4, skips_on_cpu=True, ff_chunk=16, cfg_split=True, attn_chunk=32),
    "hooks": MemoryPlan(skips_on_cpu=True, ff_chunk=16, cfg_split=True, attn_chunk=32),
}


def _step(pipe, net, sample, t, context, cond):
    """A guided step as diffusers' ControlNet pipelines make it: the ControlNet, then the UNet."""
    down, mid = net(sample, t, context, cond, 0.7, return_dict=False)
    return pipe.unet(sample, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid).sample


@pytest.mark.parametrize("name", list(PLANS))
def test_a_full_plan_plants_nothing_and_its_undo_leaves_every_module_as_it_was(models, name):
    pipe, net = models
    plan = PLANS[name]
    sample, t, context, _ = unet_inputs(pipe.unet, 24, 16)
    cond = torch.rand(2, 3, 24 * 8, 16 * 8)
    before = {part: module_state(m) for part, m in (("unet", pipe.unet), ("controlnet", net))}
    with torch.no_grad():
        reference = _step(pipe, net, sample, t, context, cond)
        handle = apply_memory_plan(pipe, plan, "cpu")
        undo_nets = controlnet_knobs([net], plan)
        undo_residuals = residuals_in_place(net, pipe.unet, handle.in_effect)
        try:
            out = _step(pipe, net, sample, t, context, cond)
            during = {part: module_state(m) for part, m in (("unet", pipe.unet), ("controlnet", net))}
            knobs = read_knobs(pipe, handle.in_effect)
        finally:
            undo_residuals()
            undo_nets()
            handle()
    for part, modules in during.items():
        for module, state in modules.items():
            assert state["public"] == before[part][module]["public"], (part, module)
            assert not state["forward"], (part, module, "a forward carries attributes")
    assert {part: module_state(m) for part, m in (("unet", pipe.unet), ("controlnet", net))} == before
    banded = name == "banded"
    assert handle.in_effect == KnobsInEffect(
        ff_chunk=16, cfg_split=True, bands=Bands(4, True) if banded else None,
        skip_fetch=None if banded else handle.in_effect.skip_fetch)
    assert (handle.in_effect.skip_fetch is None) == banded  # hooks park: residuals join on fetch
    assert {k: knobs[k] for k in ("ff_chunk", "cfg_split", "skips_on_cpu", "band_rows", "attn_chunk")} == \
        {"ff_chunk": 16, "cfg_split": True, "skips_on_cpu": True, "band_rows": 4 if banded else 0,
         "attn_chunk": 32}
    assert ((out - reference).abs().max() / reference.abs().max()).item() < 1e-5


def test_no_plan_is_nothing_in_effect(models):
    pipe, _ = models
    knobs = read_knobs(pipe, KnobsInEffect())
    assert not any(knobs[k] for k in ("ff_chunk", "cfg_split", "skips_on_cpu", "band_rows"))
    assert knobs["offload"] == "none"

