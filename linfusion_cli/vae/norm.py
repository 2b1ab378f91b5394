"""GroupNorm with statistics supplied from outside, so that every tile normalises alike.

Everything here stays on the tensors' device: moments, pooled statistics and the per-channel
scale and shift are small device tensors, and nothing waits for the device (no `.cpu()`, no
`.item()`), so a GPU's queue of tiles never drains at a GroupNorm. Moments are float32 sums
finished in float64 (float32 where the device has no float64: Apple's mps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_CHUNK_ELEMS = 1 << 24  # channels are reduced in chunks of about this many elements (bounded temp)


@dataclass
class Moments:
    """Per-channel moments of one region: pixel count, E[x] and E[x^2] (on the region's device)."""

    count: int  # known from shapes: no device read
    mean: torch.Tensor  # (C,) float64 (float32 on mps)
    sq: torch.Tensor  # (C,) same


@dataclass
class GroupStats:
    """Per-group mean and variance (on the device that made them), what a GroupNorm layer
    normalises with."""

    mean: torch.Tensor  # (G,) float64 (float32 on mps)
    var: torch.Tensor  # (G,) same


def stats_dtype(device: torch.device) -> torch.dtype:
    """float64 for statistics, except where the device has none (mps)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def channel_moments(x: torch.Tensor, region: tuple[slice, slice]) -> Moments:
    """Moments of x (1, C, H, W) over `region`: float32 per-channel var_mean over chunks of
    channels (bounded temporaries: a float32 copy only for half dtypes), finished in float64."""
    xr = x[0, :, region[0], region[1]]  # (C, h, w) view
    c, h, w = xr.shape
    step = max(1, _CHUNK_ELEMS // max(1, h * w))
    acc = stats_dtype(x.device)
    means, sqs = [], []
    for i in range(0, c, step):
        part = xr[i:i + step].float()  # (c', h, w); a copy only for half dtypes
        var, mean = torch.var_mean(part, dim=(1, 2), correction=0)  # (c',) float32 each
        mean = mean.to(acc)
        means.append(mean)
        sqs.append(var.to(acc) + mean * mean)
    return Moments(h * w, torch.cat(means), torch.cat(sqs))


def group_stats(mean_c: torch.Tensor, sq_c: torch.Tensor, groups: int) -> GroupStats:
    """Group stats from per-channel E[x], E[x^2] (C,) over one region: var = E[x^2] - E[x]^2."""
    mean_g = mean_c.view(groups, -1).mean(1)  # (G,) channels of a group have equal counts
    sq_g = sq_c.view(groups, -1).mean(1)
    return GroupStats(mean_g, (sq_g - mean_g * mean_g).clamp_min(0.0))


def pool(parts: list[Moments], groups: int) -> GroupStats:
    """Pool regions' channel moments into group stats over their union (on their device)."""
    total = sum(p.count for p in parts)
    mean_c = torch.stack([p.mean * (p.count / total) for p in parts]).sum(0)  # (C,)
    sq_c = torch.stack([p.sq * (p.count / total) for p in parts]).sum(0)
    return group_stats(mean_c, sq_c, groups)


def torch_group_stats(x: torch.Tensor, groups: int) -> GroupStats:
    """The stats torch's GroupNorm would use for the whole of x (1, C, H, W)."""
    return pool([channel_moments(x, (slice(None), slice(None)))], groups)


def per_channel(g: torch.Tensor, channels: int) -> torch.Tensor:
    """A per-group vector (G,) repeated for the channels of each group: (C,), no device read."""
    groups = g.shape[0]
    return g.view(groups, 1).expand(groups, channels // groups).reshape(channels)


def affine(norm: nn.GroupNorm, stats: GroupStats, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, C, 1, 1) float32 on the stats' device, with
    norm(x) == x * scale + shift under `stats`."""
    rstd = per_channel(torch.rsqrt(stats.var + norm.eps), channels)  # (C,) float64
    scale, shift = rstd, -per_channel(stats.mean, channels) * rstd
    if norm.affine:
        w = norm.weight.detach().to(rstd.dtype)
        scale, shift = scale * w, shift * w + norm.bias.detach().to(rstd.dtype)
    return scale.float().view(1, channels, 1, 1), shift.float().view(1, channels, 1, 1)


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, stats: GroupStats) -> torch.Tensor:
    """norm(x) but with given stats (on x's device): (x - mean) * rsqrt(var + eps) * weight + bias."""
    scale, shift = affine(norm, stats, x.shape[1])  # (1, C, 1, 1) each
    y = torch.addcmul(shift, x, scale)  # (1, C, H, W), float32 math like torch's kernel
    return y.to(x.dtype)
