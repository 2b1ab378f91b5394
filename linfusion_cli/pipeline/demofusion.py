"""DemoFusion-style stage pieces (as in the official LinFusion SD-XL super-resolution pipeline).

Pure tensor functions and one context manager; the stage that strings them together is
demofusion_stage.py. Equations, with T the scheduler's training timesteps and t the current one:

    cosine(t) = (1 + cos(pi * (T - t) / T)) / 2        # 1 at t = T, 0 at t = 0
    c1 = cosine ** cosine_scale_1                       # skip residual toward the noised input
    c2 = cosine ** cosine_scale_2                       # weight of the dilated pass
    c3 = 0.99 * cosine ** cosine_scale_3 + 0.01         # scales the Gaussian filter's sigma
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class StepWeights:
    """The three cosine weights of one denoising step."""

    cosine: float
    skip: float  # c1
    dilated: float  # c2
    sigma_scale: float  # c3


def cosine_factor(t: float, train_steps: int) -> float:
    """(1 + cos(pi (T - t) / T)) / 2, computed as the official pipeline does (float32 torch)."""
    t = torch.as_tensor(t)
    return (0.5 * (1 + torch.cos(torch.pi * (train_steps - t) / train_steps))).item()


def step_weights(t: float, train_steps: int, cosine_scale_1: float, cosine_scale_2: float,
                 cosine_scale_3: float) -> StepWeights:
    """c1, c2, c3 at timestep t."""
    c = cosine_factor(t, train_steps)
    return StepWeights(c, c ** cosine_scale_1, c ** cosine_scale_2, 0.99 * c ** cosine_scale_3 + 1e-2)


def dilation_scale(width: int, height: int, trained_px: int) -> int:
    """The stage's dilation: how many times the model's trained size fits its long side, rounded up."""
    return max(1, math.ceil(max(width, height) / trained_px))


def gaussian_kernel(kernel_size: int, sigma: float) -> torch.Tensor:
    """Normalised 2-D Gaussian (k, k): the outer product of a normalised 1-D one, centred."""
    x = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def gaussian_blur(latents: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Per-channel Gaussian filter, zero padding, same size: (B, C, h, w) -> (B, C, h, w)."""
    c = latents.shape[1]
    kernel = gaussian_kernel(kernel_size, sigma).to(latents.device, latents.dtype)
    weight = kernel.expand(c, 1, kernel_size, kernel_size)  # (C, 1, k, k), depthwise
    return F.conv2d(latents, weight, padding=kernel_size // 2, groups=c)


def match_stats(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """x with each (sample, channel) plane renormalised to the given mean and std (B, C, 1, 1)."""
    return (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True) * std + mean


def blurred_input(latents: torch.Tensor, scale: int, sigma: float) -> torch.Tensor:
    """The dilated pass's input: latents blurred with a (2 scale - 1)^2 kernel, stats kept."""
    std, mean = latents.std(dim=(2, 3), keepdim=True), latents.mean(dim=(2, 3), keepdim=True)
    return match_stats(gaussian_blur(latents, 2 * scale - 1, sigma), mean, std)


@contextlib.contextmanager
def dilated_convs(model: nn.Module, scale: int):
    """Every Conv2d in model with dilation and padding multiplied by scale; restored on exit.

    For a stride-1 k x k conv with padding (k - 1) / 2 the output keeps its size, and each
    output pixel sees the input on a grid `scale` pixels apart (the model's trained receptive
    field over a scale-times larger image).
    """
    saved = []
    try:
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                saved.append((module, module.dilation, module.padding))
                if scale != 1:
                    module.dilation = tuple(scale * d for d in module.dilation)
                    if not isinstance(module.padding, str):  # "same"/"valid" follow the dilation
                        module.padding = tuple(scale * p for p in module.padding)
        yield
    finally:
        for module, dilation, padding in saved:
            module.dilation, module.padding = dilation, padding
