"""Tensor names and shapes of a single-file checkpoint, read without building a model."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError


def single_file_keys(path: Path, allow_pickle: bool) -> dict:
    """{key: shape} of a single-file checkpoint; an unreadable file is an InputError."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        if not allow_pickle:  # open_pipeline refuses these first; never unpickle by accident
            raise InputError(f"{path.name}: single-file models must be .safetensors")
        from diffusers.loaders.single_file_utils import load_single_file_checkpoint

        checkpoint = load_single_file_checkpoint(str(path))  # torch.load(weights_only=True)
        return {k: tuple(getattr(v, "shape", ())) for k, v in checkpoint.items()}
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 -- SafetensorError, UnpicklingError, zipfile errors
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path.name} is not a readable checkpoint: {why}") from None


def single_file_family(keys: dict) -> str:
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl"
    v2 = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    return "sd21" if keys.get(v2, (0,))[-1] == 1024 else "sd15"
