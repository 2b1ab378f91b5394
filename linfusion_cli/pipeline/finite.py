"""NaN/inf guard: fp16 can overflow in the UNet or the VAE; such a stage is rerun with that part in
bf16 where the device has it natively (fp16's two bytes, fp32's range), else in float32."""

from __future__ import annotations

import torch

from ..errors import NonFiniteError
from ..models.loading import native_bf16

WIDE = torch.float32


def check(x: torch.Tensor, part: str) -> torch.Tensor:
    """x unchanged when every value is finite; else NonFiniteError naming the part (unet, vae)."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(part)
    return x


def retry_dtype(model, part: str) -> torch.dtype | None:
    """The dtype `part` (unet, vae) of a LoadedModel is retried in after NaN/inf: bf16 from fp16
    where the device has bf16 natively, else float32; None when it is float32 already."""
    now = model.vae_dtype if part == "vae" else model.dtype
    if now == torch.float16 and native_bf16(model.device):
        return torch.bfloat16
    return None if now == WIDE else WIDE


def widen(model, part: str, dtype: torch.dtype = WIDE) -> bool:
    """Move `part` of a LoadedModel to `dtype` for the rest of the run; False if it already is."""
    pipe = model.pipe
    if part == "vae":
        if model.vae_dtype == dtype:
            return False
        pipe.vae.to(dtype=dtype)
        model.vae_dtype = dtype
        return True
    if model.dtype == dtype:
        return False
    # the UNet's inputs take the text encoders' dtype: all of them move together
    for name in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(dtype=dtype)
    model.dtype = dtype
    return True


def widened(model, plan) -> list[str]:
    """The parts a NaN retry moved to float32 so far (a checkpoint records them for --resume)."""
    moved = [("unet", model.dtype, plan.dtype), ("vae", model.vae_dtype, plan.vae_dtype)]
    return [part for part, now, planned in moved if now == WIDE and planned != "fp32"]
