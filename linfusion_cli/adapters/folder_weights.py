"""The weights inside a local ControlNet or image-encoder folder, checked from their headers.

diffusers and transformers load whatever a folder holds, `.bin` pickles included, and report a
missing, truncated or foreign file only after the model loaded. Here, at plan time: the folder must
hold `.safetensors` weights (or, only with --allow-pickle, `.bin` ones), every header must read
(a truncated file does not), and a ControlNet's tensors must have the shapes its config gives.
"""

from __future__ import annotations

import torch
import json
from pathlib import Path

from ..errors import CheckpointMismatchError, InputError, ModelNotFoundError
from ..inputs import read_bounded, regular_file
from .file_checks import safetensors_shapes

STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def weight_files(folder: Path, suffix: str) -> list[Path]:
    """The folder's weight files of one kind: a single file, or the shards its index names."""
    for stem in STEMS:
        single = folder / f"{stem}{suffix}"
        if single.exists():
            return [single]
        index = folder / f"{stem}{suffix}.index.json"
        if index.exists():
            try:
                shards = sorted(set(json.loads(read_bounded(index, "weights index"))["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise InputError(f"{index} is not a readable weights index") from None
            return [folder / name for name in shards]
    return []


def folder_format(folder: Path, what: str, allow_pickle: bool) -> tuple[str, list[Path]]:
    """('safetensors' | 'pickle', files); no weights, or pickles without --allow-pickle, refused."""
    files = weight_files(folder, ".safetensors")
    if files:
        return "safetensors", files
    pickles = weight_files(folder, ".bin")
    if pickles and not allow_pickle:
        raise InputError(f"{what}: {folder} holds pickled .bin weights (they can run code when "
                         "loaded); convert them to .safetensors or pass --allow-pickle")
    if pickles:
        for file in pickles:
            regular_file(file, f"{what}: weights")
        return "pickle", pickles
    raise ModelNotFoundError(f"{what}: {folder} has a config but no weights "
                             "(diffusion_pytorch_model.safetensors or model.safetensors)")


def header_shapes(files: list[Path], what: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} over every file; an unreadable or truncated one is one InputError line."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        shapes.update(safetensors_shapes(file, what))
    return shapes


def check_folder_weights(folder: Path, config: dict, what: str, allow_pickle: bool) -> str:
    """A ControlNet folder's weights: present, readable, with the shapes its config gives."""
    from diffusers import ControlNetModel

    fmt, files = folder_format(folder, what, allow_pickle)
    if fmt == "pickle":
        return fmt  # shapes would need unpickling; from_pretrained loads it with weights_only=True
    shapes = header_shapes(files, what)
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in ControlNetModel.from_config(clean).state_dict().items()}
    except Exception as exc:  # noqa: BLE001 -- a config diffusers cannot build: one line
        raise InputError(f"{what}: {folder / 'config.json'} does not describe a ControlNet: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise CheckpointMismatchError(f"{what}: {folder.name}'s weights lack {len(missing)} tensors its "
                                      f"config has (first: {missing[0]})")
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise CheckpointMismatchError(f"{what}: {folder.name}'s weights do not fit its config (another "
                                          f"model family?): {key} is {list(shapes[key])}, the config "
                                          f"needs {list(shape)}")
    return fmt


def check_encoder_weights(folder: Path, what: str, allow_pickle: bool) -> str:
    """An image-encoder folder's weights: present and readable (pickles only if allowed)."""
    fmt, files = folder_format(folder, what, allow_pickle)
    if fmt == "safetensors":
        header_shapes(files, what)
    return fmt
