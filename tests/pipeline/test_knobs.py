"""Each memory knob leaves the UNet (and VAE) output unchanged, and undo restores the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from linfusion_cli.pipeline.knobs import SpatialInplaceSiLU, apply_knobs
from linfusion_cli.planning.memory.planner import MemoryPlan

from ..model_helpers import tiny_unet, unet_inputs

KNOBS = {
    "ff_chunk": MemoryPlan(ff_chunk=7),  # uneven: 256 tokens in chunks of 7
    "cfg_split": MemoryPlan(cfg_split=True),
    "inplace": MemoryPlan(inplace=True),
    "skips_on_cpu": MemoryPlan(skips_on_cpu=True),
    "all": MemoryPlan(ff_chunk=5, cfg_split=True, inplace=True, skips_on_cpu=True),
}


def _run(unet, inputs):
    sample, t, context, kwargs = inputs
    with torch.inference_mode():
        return unet(sample, t, encoder_hidden_states=context, **kwargs).sample


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("knob", list(KNOBS))
def test_knob_keeps_unet_output(family, knob):
    unet = tiny_unet(family)
    inputs = unet_inputs(unet, 16, 16, batch=2)
    reference = _run(unet, inputs)
    handle = apply_knobs(unet, None, KNOBS[knob])
    out = _run(unet, inputs)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    handle()
    torch.testing.assert_close(_run(unet, inputs), reference, rtol=0, atol=0)


def test_cfg_split_runs_two_half_batches():
    unet = tiny_unet("sd15")
    seen = []
    unet.conv_in.register_forward_hook(lambda m, a, o: seen.append(o.shape[0]))
    handle = apply_knobs(unet, None, MemoryPlan(cfg_split=True))
    _run(unet, unet_inputs(unet, 8, 8, batch=2))
    assert seen == [1, 1]
    handle()
    seen.clear()
    _run(unet, unet_inputs(unet, 8, 8, batch=2))
    assert seen == [2]


def test_cfg_split_keeps_tuple_output_and_scalar_timestep():
    unet = tiny_unet("sdxl")
    sample, _, context, kwargs = unet_inputs(unet, 8, 8, batch=2)
    with torch.inference_mode():
        ref = unet(sample, torch.tensor([500, 500]), context, **kwargs, return_dict=False)[0]
        handle = apply_knobs(unet, None, MemoryPlan(cfg_split=True))
        out = unet(sample, torch.tensor([500, 500]), context, **kwargs, return_dict=False)
    handle()
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-5)


def test_skips_on_cpu_moves_every_skip_out_and_back():
    unet = tiny_unet("sd15")
    handle = apply_knobs(unet, None, MemoryPlan(skips_on_cpu=True))
    _run(unet, unet_inputs(unet, 16, 16))
    # conv_in output + per down block: layers_per_block resnets (+ a downsampler if not last)
    n_blocks = len(unet.down_blocks)
    expected = 1 + n_blocks * unet.config.layers_per_block + (n_blocks - 1)
    assert handle.stats == {"skips_to_cpu": expected, "skips_to_device": expected}
    handle()
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in unet.down_blocks)
    assert not any(b._forward_pre_hooks for b in unet.up_blocks)
    assert not unet.conv_in._forward_hooks


def test_skips_on_cpu_parks_skips_off_the_compute_device():
    """Hooks registered after ours see the parked tuples (on the CPU) and every one coming back."""
    unet = tiny_unet("sd15")
    parked, returned = [], []
    handle = apply_knobs(unet, None, MemoryPlan(skips_on_cpu=True))
    for block in unet.down_blocks:  # registered after ours: sees the parked tuple
        block.register_forward_hook(lambda m, a, o: parked.extend(t.device.type for t in o[1]))
    for block in unet.up_blocks:  # registered after ours: sees the tuple moved back
        block.register_forward_pre_hook(
            lambda m, a, k: returned.extend(t.device.type for t in k["res_hidden_states_tuple"]),
            with_kwargs=True)
    _run(unet, unet_inputs(unet, 16, 16))
    handle()
    assert parked and set(parked) == {"cpu"} and len(returned) == handle.stats["skips_to_device"]


def test_inplace_swaps_silu_and_undo_restores():
    from diffusers import AutoencoderKL

    from linfusion_cli.models.tiny import VAE_CONFIG

    unet, vae = tiny_unet("sd15"), AutoencoderKL(**VAE_CONFIG).eval()
    before = {n: m for n, m in list(unet.named_modules()) + list(vae.named_modules())
              if type(m) is nn.SiLU}
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        ref = vae.decode(vae.encode(x).latent_dist.mode()).sample
    handle = apply_knobs(unet, vae, MemoryPlan(inplace=True))
    assert not any(type(m) is nn.SiLU for m in unet.modules())
    assert sum(isinstance(m, SpatialInplaceSiLU) for m in vae.modules()) > 0
    with torch.inference_mode():
        out = vae.decode(vae.encode(x).latent_dist.mode()).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    handle()
    after = {n: m for n, m in list(unet.named_modules()) + list(vae.named_modules())
             if type(m) is nn.SiLU}
    assert all(after[n] is m for n, m in before.items()) and len(after) == len(before)


def test_naive_inplace_silu_would_corrupt_the_shared_time_embedding():
    """Why SpatialInplaceSiLU exists: ResnetBlock2D applies its SiLU to the shared temb too."""
    unet = tiny_unet("sd15")
    inputs = unet_inputs(unet, 8, 8)
    reference = _run(unet, inputs)
    for parent in list(unet.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.SiLU:
                setattr(parent, name, nn.SiLU(inplace=True))
    assert not torch.allclose(_run(unet, inputs), reference, atol=1e-4)


def test_inplace_silu_is_out_of_place_with_autograd_and_on_time_embeddings():
    act = SpatialInplaceSiLU()
    temb = torch.randn(2, 8)
    with torch.no_grad():
        act(temb)
        spatial = torch.randn(1, 4, 3, 3)
        copy = spatial.clone()
        act(spatial)
    assert not torch.equal(spatial, copy)  # in place under no_grad
    x = torch.randn(1, 4, 3, 3, requires_grad=True)
    act(x * 1).sum().backward()  # out of place with autograd: gradients work
    assert x.grad is not None


def test_attn_chunk_sets_linfusion_chunk_size_and_keeps_output():
    from linfusion_cli.attention import apply_linfusion, linfusion_layers

    unet = tiny_unet("sd15")
    apply_linfusion(unet)
    layers = linfusion_layers(unet)
    inputs = unet_inputs(unet, 16, 16)
    reference = _run(unet, inputs)
    old = [layer.chunk_size for layer in layers]
    handle = apply_knobs(unet, None, MemoryPlan(attn_chunk=5))
    assert layers and all(layer.chunk_size == 5 for layer in layers)
    torch.testing.assert_close(_run(unet, inputs), reference, rtol=1e-5, atol=1e-5)
    handle()
    assert [layer.chunk_size for layer in layers] == old
