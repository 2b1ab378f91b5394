"""Single-file ControlNets (lllyasviel / A1111 `control_model.*` layout, or diffusers keys in one file).

Users mostly download ControlNets as one `.safetensors` file. diffusers' `from_single_file`
reads them but, without a config, fetches a default config repo from the hub (offline: fails)
and would guess the architecture. Here the architecture is read from the file's tensor shapes
when the plan is made (the safetensors header only): its keys are renamed by diffusers' own
converter (`convert_controlnet_checkpoint`, run on meta tensors, so no weights are read), the
config is the one `ControlNetModel.from_unet` would make of this model's UNet with the file's
own conditioning-embedding and input widths, and every converted tensor must have the shape a
ControlNet of that config expects. That config is what the planner counts and what
`from_single_file` is given (as a config folder), so what is planned is what loads.
Pickle files (.ckpt/.pth/.pt/.bin) are read only with --allow-pickle.
"""

from __future__ import annotations

import torch
import inspect
import json
import tempfile
from pathlib import Path

from ..errors import CheckpointMismatchError, InputError
from .file_checks import family_of_cross_dim
from ..io.weight_files import single_file_keys

PICKLE_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")
SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)

def is_single_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SUFFIXES


def file_format(path: Path) -> str:
    """'safetensors' or 'pickle' (what the plan records and the loader honours)."""
    return "safetensors" if path.suffix.lower() == ".safetensors" else "pickle"


def from_unet_config(unet_config: dict) -> dict:
    """The config ControlNetModel.from_unet makes of a UNet (the keys both share)."""
    from diffusers import ControlNetModel

    keys = set(inspect.signature(ControlNetModel.__init__).parameters)
    return {k: v for k, v in unet_config.items() if k in keys and k != "in_channels"}


def _shapes(path: Path, what: str, pickle_ok: bool) -> dict[str, tuple[int, ...]]:
    """{key: shape}: the safetensors header, or (with --allow-pickle) the unpickled state dict."""
    if file_format(path) == "pickle" and not pickle_ok:
        raise InputError(f"{what}: {path.name} is a pickle file (arbitrary code on load); "
                         "use a .safetensors file or pass --allow-pickle")
    try:
        return single_file_keys(path, pickle_ok)
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None


def convert(checkpoint: dict, layers_per_block: int) -> dict:
    """Original-layout keys -> diffusers keys, by diffusers' own converter (diffusers keys pass).

    The converter reads only `layers_per_block` from the config (to number the down blocks):
    the UNet's; a file built otherwise then fails the shape check. It leaves out SD-XL's
    `label_emb` (the added time/size embedding); that is mapped here by diffusers' own table."""
    from diffusers.loaders.single_file_utils import (DIFFUSERS_TO_LDM_MAPPING, LDM_CONTROLNET_KEY,
                                                     convert_controlnet_checkpoint)

    if "time_embedding.linear_1.weight" in checkpoint:
        return dict(checkpoint)  # diffusers keys already
    out = convert_controlnet_checkpoint(checkpoint, {"layers_per_block": layers_per_block})
    out = {k: v for k, v in out.items() if v is not None}
    if out:
        table = DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"]
        for new, old in table.items():
            value = checkpoint.get(LDM_CONTROLNET_KEY + old, checkpoint.get(old))
            if value is not None:
                out[new] = value
    return out


def _converted(shapes: dict[str, tuple[int, ...]], layers_per_block: int) -> dict:
    """convert() on meta tensors (no weights read): {diffusers key: meta tensor}."""
    return convert({k: torch.empty(s, device="meta") for k, s in shapes.items()}, layers_per_block)


def derive_config(shapes: dict[str, tuple[int, ...]], unet_config: dict, name: str, what: str) -> dict:
    """The ControlNet config a file's shapes describe, checked against this model's UNet."""
    from diffusers import ControlNetModel

    sd = _converted(shapes, unet_config.get("layers_per_block", 2))
    if "conv_in.weight" not in sd or "controlnet_cond_embedding.conv_in.weight" not in sd:
        raise InputError(f"{what}: {name} is not a ControlNet checkpoint (no control_model.* "
                         "or ControlNet keys)")
    cross = next((v.shape[-1] for k, v in sorted(sd.items()) if k.endswith("attn2.to_k.weight")), None)
    want = unet_config.get("cross_attention_dim")
    if cross is not None and want is not None and cross != want:
        raise CheckpointMismatchError(f"{what}: {name} is for {family_of_cross_dim(cross, want)} "
                                      f"(cross-attention input {cross}); this model's is {want}")
    channels = [sd[k].shape[0] for k in sorted((k for k in sd if k.startswith("down_blocks.")
                                                and k.endswith("resnets.0.conv1.weight")),
                                               key=lambda k: int(k.split(".")[1]))]
    if channels != list(unet_config.get("block_out_channels", [])):
        raise CheckpointMismatchError(f"{what}: {name} has block channels {channels}, the UNet "
                                      f"{list(unet_config.get('block_out_channels', []))}")
    blocks = sorted(int(k.split(".")[2]) for k in sd
                    if k.startswith("controlnet_cond_embedding.blocks.") and k.endswith(".weight"))
    embed = [sd["controlnet_cond_embedding.conv_in.weight"].shape[0]] + \
        [sd[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0] for i in blocks[1::2]]
    config = from_unet_config(unet_config) | {
        "in_channels": sd["conv_in.weight"].shape[1],
        "conditioning_channels": sd["controlnet_cond_embedding.conv_in.weight"].shape[1],
        "conditioning_embedding_out_channels": embed}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ControlNetModel.from_config(config).state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise CheckpointMismatchError(f"{what}: {name} lacks {len(missing)} tensors a ControlNet for "
                                      f"this model has (first: {missing[0]})")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise CheckpointMismatchError(f"{what}: {name} has {len(extra)} tensors a ControlNet for this "
                                      f"model does not (first: {extra[0]})")
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            raise CheckpointMismatchError(f"{what}: {name} does not fit this model: {key} is "
                                          f"{list(sd[key].shape)}, the UNet's ControlNet needs {list(shape)}")
    return config


def single_file_config(path: Path, unet_config: dict, what: str, *, pickle_ok: bool = False) -> dict:
    """derive_config for a file (the plan derives it once, into its ControlNetSpec)."""
    return derive_config(_shapes(path, what, pickle_ok), unet_config, path.name, what)


def load_single_file(path: Path, unet, what: str, *, pickle_ok: bool = False, config: dict | None = None):
    """ControlNetModel.from_single_file with the plan's derived config (a temporary config folder)."""
    from diffusers import ControlNetModel

    if config is None:  # loaded outside a plan
        config = single_file_config(path, dict(unet.config), what, pickle_ok=pickle_ok)
    if file_format(path) == "pickle" and not pickle_ok:
        raise InputError(f"{what}: {path.name} is a pickle file; pass --allow-pickle")
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    # diffusers' reader (safetensors, or torch.load(weights_only=True)); keys converted here so
    # SD-XL's label_emb is kept; from_single_file takes the converted dict as it is
    checkpoint = convert(load_single_file_checkpoint(str(path), local_files_only=True),
                         unet.config.get("layers_per_block", 2))
    with tempfile.TemporaryDirectory(prefix="linfusion-controlnet-") as folder:
        Path(folder, "config.json").write_text(json.dumps(config | {"_class_name": "ControlNetModel"}))
        return ControlNetModel.from_single_file(checkpoint, config=folder, dtype=unet.dtype,
                                                local_files_only=True)
