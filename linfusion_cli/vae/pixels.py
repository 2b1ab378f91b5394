"""uint8 images <-> the VAE's tensors, with diffusers' image processor's exact arithmetic."""

from __future__ import annotations

import numpy as np
import torch
from ..errors import NonFiniteError
from ..runtime import transfer


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8, like diffusers' image processor, in float32.

    NaN/inf (an fp16 overflow) raise NonFiniteError("vae") instead of turning black. A meta x
    (the cost ledger's full-size count) gives a zero image of its shape, the copy counted."""
    if not x.is_meta and not bool(torch.isfinite(x).all()):
        raise NonFiniteError("vae")
    x = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)  # (1, 3, H, W)
    if not transfer.is_host(x):  # the uint8 pixels cross to the host once
        x = transfer.to_host(x)
    if x.is_meta:
        return np.zeros((x.shape[2], x.shape[3], 3), dtype=np.uint8)
    return x[0].permute(1, 2, 0).numpy()


def preprocess(arr: np.ndarray, device, dtype) -> torch.Tensor:
    """uint8 (H, W, 3) -> (1, 3, H, W) in [-1, 1], exactly as VaeImageProcessor does it.

    Same arithmetic (numpy float32 x/255, then 2x-1) and same channels-last strides as its
    `numpy_to_pt`, since torch's conv picks other kernels (other rounding) for that layout.
    """
    arr = np.ascontiguousarray(arr)  # (H, W, 3) C-order, as np.array(PIL image) is
    x = torch.from_numpy((arr.astype(np.float32) / 255.0)[None].transpose(0, 3, 1, 2))
    x = (2.0 * x - 1.0).to(dtype)  # (1, 3, H, W) on the host, in the VAE's dtype
    return x if torch.device(device).type == "cpu" else transfer.to_device(x, device)


def as_uint8_image(image) -> np.ndarray:
    """PIL image or uint8 array -> uint8 (H, W, 3)."""
    arr = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a PIL image or uint8 (H, W, 3) array, got {arr.dtype} {arr.shape}")
    return arr
