"""The band-wise UNet (linfusion_cli/bands) against diffusers' own forward: equal in fp32 on the
CPU up to float summation order (1e-5 relative), for every family, band sizes that do and do
not divide the height, skips parked or not, the DemoFusion dilated pass, LoRA, IP-Adapter
tokens and ControlNets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from linfusion_cli.bands.rows import Full, Moments, band_ranges, conv_rows, normed
from linfusion_cli.bands.unet_forward import banded_forward
from linfusion_cli.pipeline.knobs import apply_knobs, read_knobs
from linfusion_cli.planning.memory.planner import MemoryPlan

from ..model_helpers import Pipe, linfusion_unet, module_state, tiny_unet, unet_inputs

TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def unets():
    return {family: linfusion_unet(family) for family in ("sd15", "sd21", "sdxl")}


# ---------------------------------------------------------------- pure pieces

class _Wrapped(nn.Module):
    """A conv behind a wrapper (as peft's LoRA layers wrap one): conv_rows must call it."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.base_layer = conv

    def forward(self, x):
        return self.base_layer(x) * 1.5


@pytest.mark.parametrize("stride,dilation,rows", [(1, 1, 3), (1, 3, 2), (2, 1, 3), (2, 2, 5)])
def test_conv_rows_equals_the_whole_convolution(stride, dilation, rows):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=dilation, dilation=dilation)
    x = torch.randn(2, 4, 19, 11)
    for module, reference in ((conv, conv(x)), (_Wrapped(conv), conv(x) * 1.5)):
        bands = [conv_rows(module, Full(x), a, b)
                 for a, b in band_ranges(reference.shape[2], rows)]
        assert torch.allclose(torch.cat(bands, dim=2), reference, atol=1e-6)


def test_group_norm_from_band_moments_equals_torch():
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 8)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 13, 7) * 3 + 1  # two samples: statistics are per sample
    m = Moments()
    for a, b in band_ranges(13, 4):
        m.add(x[:, :, a:b])
    assert _rel(normed(x, m.affine(norm)), norm(x)) < TOL


# ---------------------------------------------------------------- the UNet

CASES = [  # a covering set: each family, dividing and non-dividing bands, parked or not, and
    # None: one band per level (band parallelism without band_rows)
    ("sd15", 16, 16, 1, False), ("sd15", 23, 17, 5, True), ("sd21", 16, 24, 3, True),
    ("sd21", 19, 16, 64, False), ("sdxl", 16, 16, 2, True), ("sdxl", 23, 17, 3, False),
    ("sd15", 23, 17, None, True),
]


@pytest.mark.parametrize("family,h,w,rows,park", CASES)
def test_banded_unet_equals_diffusers(unets, family, h, w, rows, park):
    unet = unets[family]
    sample, t, context, kwargs = unet_inputs(unet, h, w)
    with torch.no_grad():
        reference = unet(sample, t, encoder_hidden_states=context, **kwargs).sample
        out = banded_forward(unet, rows, park, sample, t, context, **kwargs).sample
    assert out.shape == reference.shape
    assert _rel(out, reference) < TOL


def test_knob_applies_the_banded_forward_with_the_other_knobs(unets):
    """band_rows through apply_knobs with the CFG split, chunks, in-place SiLU and parked skips;
    read back as it ran, and the plain forward back after the undo."""
    unet = unets["sd15"]
    sample, t, context, kwargs = unet_inputs(unet, 24, 16)
    with torch.no_grad():
        reference = unet(sample, t, encoder_hidden_states=context).sample
        plan = MemoryPlan(band_rows=4, cfg_split=True, ff_chunk=16, attn_chunk=32, inplace=True,
                          skips_on_cpu=True)
        before = module_state(unet)
        undo = apply_knobs(unet, None, plan)
        try:
            calls = []
            hook = unet.down_blocks[0].register_forward_hook(lambda *a: calls.append(1))
            out = unet(sample, t, encoder_hidden_states=context).sample

            knobs = read_knobs(Pipe(unet, nn.Identity()), undo.in_effect)
        finally:
            hook.remove()
            undo()
    assert calls == []  # the blocks' own forwards never ran: the bands did the work
    assert knobs["band_rows"] == 4 and knobs["skips_on_cpu"] and knobs["cfg_split"]
    assert _rel(out, reference) < TOL
    assert module_state(unet) == before


def test_dilated_pass_widens_the_halo(unets):
    """DemoFusion's second pass dilates every conv: the bands read the wider halo."""
    from linfusion_cli.pipeline.demofusion import dilated_convs

    unet = unets["sdxl"]
    sample, t, context, kwargs = unet_inputs(unet, 24, 24)
    with torch.no_grad(), dilated_convs(unet, 3):
        reference = unet(sample, t, encoder_hidden_states=context, **kwargs).sample
        out = banded_forward(unet, 2, True, sample, t, context, **kwargs).sample
    assert _rel(out, reference) < TOL


def test_lora_and_ip_adapter_tokens_go_through_the_bands(unets, tmp_path):
    """peft LoRA layers (wrapped projections and convs) and IP-Adapter's extra context tokens."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from peft import LoraConfig, inject_adapter_in_model

    unet = linfusion_unet("sd15")
    config = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2",
                                        "proj_in", "ff.net.2"])
    inject_adapter_in_model(config, unet)
    procs = {}
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.rsplit(".", 1)[0]).to_q.out_features
            p = IPAdapterAttnProcessor2_0(hidden, unet.config.cross_attention_dim, num_tokens=(4,),
                                          scale=0.7)
            nn.init.normal_(p.to_k_ip[0].weight, std=0.2)
            nn.init.normal_(p.to_v_ip[0].weight, std=0.2)
            procs[name] = p
        else:
            procs[name] = proc
    unet.set_attn_processor(procs)
    sample, t, context, _ = unet_inputs(unet, 16, 24)
    tokens = torch.randn(2, 4, unet.config.cross_attention_dim)
    # IP-Adapter's processor reads the (text, [image tokens]) pair the UNet forwards
    both = (context, [tokens])
    with torch.no_grad():
        reference = unet(sample, t, encoder_hidden_states=both).sample
        out = banded_forward(unet, 3, False, sample, t, both).sample
    assert _rel(out, reference) < TOL


def test_controlnet_banded_equals_diffusers(unets):
    from diffusers import ControlNetModel

    from linfusion_cli.adapters.controlnet import prepare_controlnet
    from linfusion_cli.bands.controlnet_forward import banded_controlnet_forward

    for family in ("sd15", "sdxl"):
        unet = unets[family]
        torch.manual_seed(3)
        net = ControlNetModel.from_unet(type(unet).from_config(unet.config)).eval()
        for p in list(net.controlnet_down_blocks.parameters()) + list(net.controlnet_mid_block.parameters()):
            nn.init.normal_(p, std=0.1)
        net = prepare_controlnet(net, unet)
        sample, t, context, kwargs = unet_inputs(unet, 24, 16)
        cond = torch.rand(2, 3, 24 * 8, 16 * 8)
        with torch.no_grad():
            down, mid = net(sample, t, context, cond, 0.7, **kwargs, return_dict=False)
            bdown, bmid = banded_controlnet_forward(net, 5, False, sample, t, context, cond, 0.7,
                                                    **kwargs, return_dict=False)
        assert len(bdown) == len(down)
        assert max(_rel(a, b) for a, b in zip([*bdown, bmid], [*down, mid])) < TOL


def test_softmax_attention_is_refused():
    unet = tiny_unet("sd15")  # no LinFusion
    sample, t, context, _ = unet_inputs(unet, 16, 16)
    with pytest.raises(ValueError, match="LinFusion"):
        apply_knobs(unet, None, MemoryPlan(band_rows=4))
    assert "forward" not in unet.__dict__
    del sample, t, context


# ---------------------------------------------------------------- the whole CLI run

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cli_run_banded_image_within_one_level(cli, tmp_path, family):
    """A whole generate run (base + x2 stage; SD-XL's preset stage is DemoFusion, dilated pass
    included) with band_rows forced by a preset equals the unbanded run within 1 uint8 level,
    and the record says the bands ran."""
    import json

    import numpy as np
    from PIL import Image

    from linfusion_cli.io.metadata import read_metadata

    model = "demo" if family == "sd15" else "demo-sdxl"
    files = {}
    for name, memory in (("plain", ""), ("banded", "memory:\n  band_rows: 3\n  skips_on_cpu: false\n")):
        preset = tmp_path / f"{name}.yaml"
        preset.write_text(f"family: {family}\nnative: 64\nsteps: 4\nstrengths: [0.5]\n{memory}")
        out = tmp_path / f"{name}.png"
        r = cli("generate", "a lighthouse", "--model", model, "--preset", str(preset),
                "--res", "128", "--seed", "7", "--json", "-o", str(out))
        assert r.code == 0, r.err
        files[name] = out
        json.loads(r.out_lines[0])
    record = read_metadata(files["banded"])["record"]
    assert [s["memory_in_effect"]["band_rows"] for s in record["stages"]] == [3, 3]
    plain = read_metadata(files["plain"])["record"]
    assert all(s["memory_in_effect"]["band_rows"] == 0 for s in plain["stages"])
    a = np.asarray(Image.open(files["plain"]).convert("RGB"), dtype=int)
    b = np.asarray(Image.open(files["banded"]).convert("RGB"), dtype=int)
    assert np.abs(a - b).max() <= 1
