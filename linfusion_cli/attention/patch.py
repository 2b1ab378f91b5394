"""Mount LinFusion on every UNet self-attention (`attn1`) and take it off again exactly."""

from __future__ import annotations

from torch import nn

from ..errors import CheckpointMismatchError
from .checkpoint import (ModuleSpec, check_compatible, load_checkpoint, specs_from_tensors,
                         state_for_module)
from .module import LinFusionAttention

_ORIGINALS = "_linfusion_originals"  # attribute on the UNet: {module name: original attn1}


def _is_self_attention(name: str, module: nn.Module) -> bool:
    return name.endswith(".attn1") and hasattr(module, "to_q") and hasattr(module, "heads")


def self_attention_specs(unet: nn.Module) -> list[ModuleSpec]:
    """The UNet's self-attention layers in module order, as the official config lists them."""
    originals = getattr(unet, _ORIGINALS, {})
    specs = []
    for name, module in unet.named_modules():
        module = originals.get(name, module)
        if _is_self_attention(name, module):
            specs.append(ModuleSpec(name, module.to_q.in_features, module.heads))
    return specs


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, module)


def apply_linfusion(unet: nn.Module, weights=None, *, projection_mid_dim: int | None = None,
                    chunk_size: int | None = None) -> list[str]:
    """Replace every `attn1` with LinFusion; return the replaced module names.

    weights: a local folder or .safetensors file in the official layout, a hub repo id, or None
    for fresh layers that start from the UNet's own q/k/v/out weights.
    """
    if getattr(unet, _ORIGINALS, None):
        remove_linfusion(unet)
    unet_specs = self_attention_specs(unet)
    if not unet_specs:
        raise CheckpointMismatchError("this UNet has no self-attention (attn1) layers")
    tensors = None
    if weights is not None:
        specs, tensors = load_checkpoint(weights)
        specs = specs if specs is not None else specs_from_tensors(tensors, unet_specs)
        check_compatible(specs, unet_specs)
    else:
        specs = [ModuleSpec(s.name, s.dim, s.heads, projection_mid_dim) for s in unet_specs]

    originals = {}
    for index, spec in enumerate(specs):
        original = unet.get_submodule(spec.name)
        ref = original.to_q.weight
        if tensors is None:
            layer = LinFusionAttention.from_attention(original, spec.projection_mid_dim)
        else:
            layer = LinFusionAttention(spec.dim, spec.heads, spec.projection_mid_dim)
            state = state_for_module(tensors, index)
            try:
                layer.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[-1].strip()
                raise CheckpointMismatchError(
                    f"LinFusion weights for {spec.name} do not load: {first}") from None
        layer.chunk_size = chunk_size
        layer.to(device=ref.device, dtype=ref.dtype)
        layer.train(original.training)
        originals[spec.name] = original
        _set_submodule(unet, spec.name, layer)
    setattr(unet, _ORIGINALS, originals)
    return list(originals)


def remove_linfusion(unet: nn.Module) -> None:
    """Put the original attention modules back (the very same objects)."""
    for name, original in getattr(unet, _ORIGINALS, {}).items():
        _set_submodule(unet, name, original)
    setattr(unet, _ORIGINALS, {})


def linfusion_layers(unet: nn.Module) -> list[LinFusionAttention]:
    """Every mounted LinFusion layer (e.g. to set `chunk_size`)."""
    return [m for m in unet.modules() if isinstance(m, LinFusionAttention)]
