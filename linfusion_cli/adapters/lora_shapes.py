"""LoRA tensors checked against the model's layers from the file header, before any weights load.

peft reports a LoRA that does not fit only after the model loaded, as a 36-line log whose cause is
cut off; here every down/up pair's rank, dtype and layer widths are compared with the UNet that
the plan's config describes (built on the meta device, no memory), and the first misfit is one line.
Keys in names this model does not have (e.g. kohya files in the original LDM naming, converted by
diffusers at load) are checked for rank and dtype only.
"""

from __future__ import annotations

from torch import nn
import torch
import json
import re
from functools import lru_cache

from ..errors import CheckpointMismatchError, InputError

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# (pattern, naming): what the key's pair group and role are; naming says how to find the layer
_PATTERNS = (
    (re.compile(r"^unet\.(?P<name>.+)\.lora_(?P<role>[AB])\.weight$"), "dots"),
    (re.compile(r"^lora_unet_(?P<name>.+)\.(?P<role>lora_down|lora_up)\.weight$"), "underscores"),
    (re.compile(r"^(?P<name>.+?)[._](?P<role>lora[._]down|lora[._]up|lora_[AB])\.weight$"), None),
)


@lru_cache(maxsize=4)
def _layers(config_json: str) -> dict[str, tuple[int, int]]:
    """{module name: (in width, out width)} of the UNet a config describes (meta device)."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear):
            out[name] = (module.in_features, module.out_features)
        elif isinstance(module, nn.Conv2d):
            out[name] = (module.in_channels, module.out_channels)
    return out


def _parse(key: str):
    """(group, 'down'|'up', naming) for a LoRA weight key, else None (alpha, other tensors)."""
    for pattern, naming in _PATTERNS:
        match = pattern.match(key)
        if match:
            role = "down" if match["role"].endswith(("down", "A")) else "up"
            return match["name"], role, naming
    return None


def check_lora_tensors(name: str, shapes: dict, dtypes: dict, unet_config: dict | None) -> None:
    """Every tensor floating point; every down/up pair of one rank and of its layer's widths."""
    for key, dtype in dtypes.items():
        if dtype not in FLOAT_DTYPES:
            raise InputError(f"--lora: {name}: tensor {key} is {dtype}; LoRA weights are floating point")
    pairs: dict[str, dict] = {}
    for key, shape in shapes.items():
        parsed = _parse(key)
        if parsed is None:
            continue
        group, role, naming = parsed
        if len(shape) not in (2, 4):
            raise CheckpointMismatchError(f"--lora: {name}: {key} has shape {list(shape)}; a LoRA "
                                          "weight is a matrix or a 1x1/kxk convolution")
        pairs.setdefault(group, {"naming": naming})[role] = (key, shape)
    layers = _layers(json.dumps(unet_config, sort_keys=True, default=str)) if unet_config else {}
    by_underscores = {n.replace(".", "_"): n for n in layers}
    for group, pair in pairs.items():
        if "down" not in pair or "up" not in pair:
            key = (pair.get("down") or pair.get("up"))[0]
            raise CheckpointMismatchError(f"--lora: {name}: {key} has no matching "
                                          f"{'up' if 'down' in pair else 'down'} tensor")
        (down_key, down), (up_key, up) = pair["down"], pair["up"]
        if down[0] != up[1]:
            raise CheckpointMismatchError(f"--lora: {name}: {down_key} has rank {down[0]} but {up_key} "
                                          f"rank {up[1]}")
        layer = group if pair["naming"] == "dots" else by_underscores.get(group) \
            if pair["naming"] == "underscores" else None
        if layer not in layers:
            continue
        width_in, width_out = layers[layer]
        if down[1] != width_in or up[0] != width_out:
            raise CheckpointMismatchError(
                f"--lora: {name} does not fit this model: {layer} maps {width_in} -> {width_out}, "
                f"the LoRA {down[1]} -> {up[0]} (another model family or size)")
