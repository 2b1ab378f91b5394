"""NaN/inf guard: fp16 can overflow in the UNet or the VAE; such a stage is rerun once in float32."""

from __future__ import annotations

import torch

from ..errors import NonFiniteError

WIDE = torch.float32


def check(x: torch.Tensor, part: str) -> torch.Tensor:
    """x unchanged when every value is finite; else NonFiniteError naming the part (unet, vae)."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(part)
    return x


def widen(model, part: str) -> bool:
    """Move `part` of a LoadedModel to float32 for the rest of the run; False if it already is."""
    pipe = model.pipe
    if part == "vae":
        if model.vae_dtype == WIDE:
            return False
        pipe.vae.to(dtype=WIDE)
        model.vae_dtype = WIDE
        return True
    if model.dtype == WIDE:
        return False
    # the UNet's inputs take the text encoders' dtype: all of them move together
    for name in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(dtype=WIDE)
    model.dtype = WIDE
    return True


def widened(model, plan) -> list[str]:
    """The parts a NaN retry moved to float32 so far (a checkpoint records them for --resume)."""
    moved = [("unet", getattr(model, "dtype", None), plan.dtype),
             ("vae", getattr(model, "vae_dtype", None), plan.vae_dtype)]
    return [part for part, now, planned in moved if now == WIDE and planned != "fp32"]
