"""Mounting LinFusion on a UNet: official checkpoints, hooks, removal, family matching."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from linfusion_cli.attention import (LinFusionAttention, apply_linfusion, linfusion_repo_for,
                                     remove_linfusion, require_linfusion_repo, save_checkpoint,
                                     self_attention_specs)
from linfusion_cli.attention.naive import layer_reference
from linfusion_cli.errors import CheckpointMismatchError

from ..model_helpers import tiny_unet, unet_inputs


class ReferenceLayer(nn.Module):
    """A hand-mounted layer that runs the slow reference formula."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        return layer_reference(self.layer, hidden_states)


def write_random_checkpoint(folder, unet, *, mid=None, legacy=False, seed=3):
    """An official-layout checkpoint with random weights (written the way the hub repos are)."""
    torch.manual_seed(seed)
    specs = self_attention_specs(unet)
    layers = []
    for spec in specs:
        layer = LinFusionAttention(spec.dim, spec.heads, mid)
        for p in layer.parameters():
            nn.init.normal_(p, std=0.1)
        layers.append(layer)
    specs = [type(s)(s.name, s.dim, s.heads, mid) for s in specs]
    return save_checkpoint(folder, specs, layers, legacy_config=legacy)


def mount_reference_by_hand(unet, folder):
    """Read the official files directly and mount reference layers without our loader."""
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    for i, entry in enumerate(config["modules_list"]):
        name, dim, heads = (entry["module_name"], entry["dim_n"], entry["heads"]) \
            if isinstance(entry, dict) else entry
        mid = entry.get("projection_mid_dim") if isinstance(entry, dict) else None
        layer = LinFusionAttention(dim, heads, mid)
        layer.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items()
                               if k.split(".", 1)[0] == str(i)})
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent), child, ReferenceLayer(layer))


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
@pytest.mark.parametrize("legacy", [False, True])
def test_official_checkpoint_loads_and_matches_reference(tmp_path, family, legacy):
    unet = tiny_unet(family)
    mid = 8 if family == "sdxl" else None
    folder = write_random_checkpoint(tmp_path / "lf", unet, mid=None if legacy else mid, legacy=legacy)
    names = apply_linfusion(unet, folder)
    assert names == [s.name for s in self_attention_specs(unet)]
    reference = tiny_unet(family)
    mount_reference_by_hand(reference, folder)
    sample, t, context, kwargs = unet_inputs(unet, 8, 8)
    with torch.no_grad():
        ours = unet(sample, t, context, **kwargs).sample
        theirs = reference(sample, t, context, **kwargs).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_single_safetensors_file_without_config(tmp_path):
    unet = tiny_unet("sd15")
    folder = write_random_checkpoint(tmp_path / "lf", unet)
    (folder / "config.json").unlink()
    apply_linfusion(unet, folder / "diffusion_pytorch_model.safetensors")
    reference = tiny_unet("sd15")
    apply_linfusion(reference, write_random_checkpoint(tmp_path / "lf2", reference))
    sample, t, context, _ = unet_inputs(unet, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(unet(sample, t, context).sample, reference(sample, t, context).sample)


def test_mismatched_checkpoint_is_one_clear_error(tmp_path):
    xl_folder = write_random_checkpoint(tmp_path / "xl", tiny_unet("sdxl"))
    unet = tiny_unet("sd15")
    with pytest.raises(CheckpointMismatchError, match="another architecture|do not fit"):
        apply_linfusion(unet, xl_folder)
    assert not any(isinstance(m, LinFusionAttention) for m in unet.modules())
    wrong_dim = tiny_unet("sd21")  # same layer count and names, other widths
    folder = write_random_checkpoint(tmp_path / "sd21", wrong_dim)
    with pytest.raises(CheckpointMismatchError, match=r"dim 64.*dim 32"):
        apply_linfusion(unet, folder)


def test_missing_weights_are_a_clear_error(tmp_path):
    from linfusion_cli.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="not found"):
        apply_linfusion(tiny_unet(), tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="local cache"):  # HF_HUB_OFFLINE=1 in tests
        apply_linfusion(tiny_unet(), "Yuanshi/LinFusion-does-not-exist")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_hooks_prove_attn1_is_linfusion_and_attn2_is_original(family):
    unet = tiny_unet(family)
    cross = {n: m for n, m in unet.named_modules() if n.endswith("attn2")}
    names = apply_linfusion(unet)
    ran = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            module.register_forward_hook(lambda m, a, o, name=name: ran.update({name: type(m)}))
    sample, t, context, kwargs = unet_inputs(unet, 8, 8)
    with torch.no_grad():
        unet(sample, t, context, **kwargs)
    assert sorted(n for n, cls in ran.items() if cls is LinFusionAttention) == sorted(names)
    assert {n for n in ran if n.endswith("attn2")} == set(cross)
    assert all(ran[n] is type(cross[n]) and unet.get_submodule(n) is cross[n] for n in cross)
    assert len(names) == len(cross) > 0


def test_fresh_layers_start_from_the_unet_weights_and_remove_restores_exactly():
    unet = tiny_unet("sd15")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    originals = [unet.get_submodule(s.name) for s in self_attention_specs(unet)]
    sample, t, context, _ = unet_inputs(unet, 8, 8)
    with torch.no_grad():
        base = unet(sample, t, context).sample
        apply_linfusion(unet)
        layer = unet.get_submodule(self_attention_specs(unet)[0].name)
        torch.testing.assert_close(layer.to_q.weight, originals[0].to_q.weight)
        linear = unet(sample, t, context).sample
        remove_linfusion(unet)
        after = unet(sample, t, context).sample
    assert not torch.allclose(base, linear)  # it really changed the attention
    assert torch.equal(base, after)
    assert [unet.get_submodule(s.name) for s in self_attention_specs(unet)] == originals
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_checkpoint_loads_into_unet_dtype(tmp_path, dtype):
    unet = tiny_unet("sd15").to(dtype)
    apply_linfusion(unet, write_random_checkpoint(tmp_path / "lf", tiny_unet("sd15")))
    layers = [m for m in unet.modules() if isinstance(m, LinFusionAttention)]
    assert layers and all(p.dtype == dtype for m in layers for p in m.parameters())


def test_family_matching():
    sd15 = {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768}
    sd21 = {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024}
    sdxl = {"block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048}
    tiny = {"block_out_channels": [32, 64], "cross_attention_dim": 32}
    assert linfusion_repo_for("Lykon/dreamshaper-8", tiny) == "Yuanshi/LinFusion-1-5"
    assert linfusion_repo_for("stabilityai/stable-diffusion-2-1", tiny) == "Yuanshi/LinFusion-2-1"
    assert linfusion_repo_for("someone/finetune", sd15) == "Yuanshi/LinFusion-1-5"
    assert linfusion_repo_for(None, sd21) == "Yuanshi/LinFusion-2-1"
    assert linfusion_repo_for("x/y", sdxl) == "Yuanshi/LinFusion-XL"
    assert linfusion_repo_for("x/y", tiny) is None
    with pytest.raises(CheckpointMismatchError, match="pass --linfusion"):
        require_linfusion_repo("x/y", tiny)
