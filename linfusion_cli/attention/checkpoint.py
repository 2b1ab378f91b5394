"""The official LinFusion checkpoint format (`Yuanshi/LinFusion-*`): read, check, write.

A checkpoint is a folder with `config.json` ({"modules_list": [...]}) and
`diffusion_pytorch_model.safetensors` whose keys are "{i}.<param>" for the i-th listed module.
"""

from __future__ import annotations

from safetensors.torch import load_file
from safetensors.torch import save_file
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointMismatchError, ModelNotFoundError
from ..hub import download_command
from ..inputs import regular_file
from ..validate import json_object

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class ModuleSpec:
    """One self-attention layer as the official config lists it."""

    name: str  # e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    dim: int  # dim_n: channels C
    heads: int
    projection_mid_dim: int | None = None

    def to_config(self) -> dict:
        return {"module_name": self.name, "dim_n": self.dim, "heads": self.heads,
                "projection_mid_dim": self.projection_mid_dim}


def parse_modules_list(config: dict) -> list[ModuleSpec]:
    """Both config forms: dict entries and the older [module_name, dim_n, heads] lists."""
    entries = config.get("modules_list")
    if not isinstance(entries, list) or not entries:
        raise CheckpointMismatchError("LinFusion config has no 'modules_list'")
    specs = []
    for entry in entries:
        try:
            if isinstance(entry, dict):
                spec = ModuleSpec(entry["module_name"], int(entry["dim_n"]), int(entry["heads"]),
                                  entry.get("projection_mid_dim"))
            elif isinstance(entry, (list, tuple)) and len(entry) >= 3:
                spec = ModuleSpec(str(entry[0]), int(entry[1]), int(entry[2]),
                                  entry[3] if len(entry) > 3 else None)
            else:
                raise ValueError
            mid = spec.projection_mid_dim
            if (not isinstance(spec.name, str) or spec.dim < 1 or spec.heads < 1
                    or (mid is not None and (isinstance(mid, bool) or not isinstance(mid, int) or mid < 1))):
                raise ValueError
        except (KeyError, TypeError, ValueError, OverflowError):
            raise CheckpointMismatchError(
                f"LinFusion config: unreadable modules_list entry {str(entry)[:80]}") from None
        specs.append(spec)
    return specs


def _read_config(config: Path) -> dict:
    """A LinFusion config.json as a dict; unreadable or non-object files are one-line errors."""
    return json_object(config, "LinFusion config", CheckpointMismatchError)


def _resolve_folder(source: str | os.PathLike) -> tuple[Path, Path | None]:
    """(weights file, config file or None) for a local folder, a local file, or a hub repo id."""
    path = Path(source).expanduser()
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            found = sorted(path.glob("*.safetensors"))
            if len(found) != 1:
                raise ModelNotFoundError(f"no {WEIGHTS_NAME} in LinFusion folder {path}")
            weights = found[0]
        config = path / CONFIG_NAME
        return weights, config if config.is_file() else None
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelNotFoundError(f"LinFusion weights must be .safetensors: {path}")
        config = path.with_name(CONFIG_NAME)
        return path, config if config.is_file() else None
    if str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")):
        return _resolve_folder(_download(str(source)))
    raise ModelNotFoundError(f"LinFusion weights not found: {source}")


def check_source(source: str) -> None:
    """At plan time: a local --linfusion path holds readable weights (a hub id: checked at load)."""
    path = Path(source).expanduser()
    if not path.exists() and str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")):
        return
    if not path.exists():
        raise ModelNotFoundError(f"--linfusion {source}: not found (not a folder, .safetensors file or hub id)")
    weights, config = _resolve_folder(path)
    regular_file(weights, "LinFusion weights")
    if config is not None:
        regular_file(config, "LinFusion config")


def _download(repo_id: str) -> Path:
    """A hub repo from the local cache, or downloaded when the network is allowed."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, "*.safetensors"]))
    except Exception as exc:  # offline, missing repo, network error: all one answer for the user
        raise ModelNotFoundError(
            f"LinFusion weights {repo_id} are not in the local cache and could not be downloaded "
            f"({type(exc).__name__}); run `{download_command(repo_id)}` on a connected "
            "machine or pass a local folder with --linfusion") from None


def load_checkpoint(source) -> tuple[list[ModuleSpec] | None, dict[str, torch.Tensor]]:
    """The listed modules (None when no config ships beside the file) and the raw tensors."""
    weights, config = _resolve_folder(source)
    specs = parse_modules_list(_read_config(config)) if config else None
    return specs, load_file(str(weights))


def check_compatible(checkpoint: list[ModuleSpec], unet: list[ModuleSpec]) -> None:
    """Raise one clear message naming the first thing that differs between the two layouts."""
    if len(checkpoint) != len(unet):
        raise CheckpointMismatchError(
            f"LinFusion weights list {len(checkpoint)} self-attention layers but this UNet has "
            f"{len(unet)}: they are for another architecture (SD1.x, SD2.x and SD-XL each need "
            "their own LinFusion weights)")
    for ours, theirs in zip(unet, checkpoint):
        if (ours.name, ours.dim, ours.heads) != (theirs.name, theirs.dim, theirs.heads):
            raise CheckpointMismatchError(
                f"LinFusion weights do not fit this UNet: layer {theirs.name} (dim {theirs.dim}, "
                f"{theirs.heads} heads) vs UNet layer {ours.name} (dim {ours.dim}, {ours.heads} heads)")


def specs_from_tensors(tensors: dict[str, torch.Tensor], unet: list[ModuleSpec]) -> list[ModuleSpec]:
    """Without a config, assume the UNet's own order and read mid dims from the tensor shapes."""
    specs = []
    for i, spec in enumerate(unet):
        key = f"{i}.to_q_.0.weight"
        if key not in tensors:
            raise CheckpointMismatchError(f"LinFusion weights have no {key}: not an official checkpoint")
        mid = tensors[key].shape[0]
        specs.append(ModuleSpec(spec.name, spec.dim, spec.heads, None if mid == spec.dim else mid))
    return specs


def state_for_module(tensors: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """The tensors of the index-th module, with the "{i}." prefix removed."""
    prefix = f"{index}."
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


def save_checkpoint(folder, specs: list[ModuleSpec], layers: list[nn.Module], *,
                    legacy_config: bool = False) -> Path:
    """Write layers in the official layout (tests, and exporting freshly initialised layers)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = ([[s.name, s.dim, s.heads] for s in specs] if legacy_config
               else [s.to_config() for s in specs])
    config = {"_class_name": "LinFusion", "_diffusers_version": "0.30.0", "modules_list": entries}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    tensors = {f"{i}.{key}": value.detach().contiguous().cpu()
               for i, layer in enumerate(layers) for key, value in layer.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_NAME))
    return folder
