"""Inputs with regional structure (tests, benchmarks): iid noise would hide per-tile stat drift."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _field(gen: torch.Generator, c: int, h: int, w: int, cells: int) -> torch.Tensor:
    """Smooth random field (1, c, h, w): a coarse grid of normals upsampled bicubically."""
    gh, gw = max(2, h // cells + 2), max(2, w // cells + 2)
    g = torch.randn(1, c, gh, gw, generator=gen)
    return F.interpolate(g, size=(h, w), mode="bicubic", align_corners=False)


def structured_latent(h: int, w: int, seed: int = 0, channels: int = 4) -> torch.Tensor:
    """A latent (1, C, h, w) like the UNet's (std ~1): regions of different tone, edges, texture."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1.5, 1.5, w).view(1, 1, 1, w) * torch.randn(1, channels, 1, 1, generator=gen)
    z = ramp + _field(gen, channels, h, w, 24) + 0.5 * _field(gen, channels, h, w, 6)
    z = z + 0.3 * torch.randn(1, channels, h, w, generator=gen)
    return (z - z.mean()) / z.std()


def structured_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A uint8 (H, W, 3) picture-like image: colour gradients, blobs, a hard edge, fine noise."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.6 * _field(gen, 3, height, width, 192) + 0.3 * _field(gen, 3, height, width, 24)
    x[:, :, :, width // 3:] += 0.5  # a hard vertical edge
    x = x + 0.08 * torch.randn(1, 3, height, width, generator=gen)
    x = (x.sigmoid() * 255).round().clamp(0, 255).to(torch.uint8)
    return x[0].permute(1, 2, 0).numpy()
