"""GroupNorm with statistics supplied from outside, so that every tile normalises alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_CHUNK_ELEMS = 1 << 24  # channels are reduced in chunks of about this many elements (bounded temp)


@dataclass
class Moments:
    """Per-channel moments of one region: pixel count, E[x] and E[x^2] (float64, CPU)."""

    count: int
    mean: torch.Tensor  # (C,) float64
    sq: torch.Tensor  # (C,) float64


@dataclass
class GroupStats:
    """Per-group mean and variance (float64, CPU), what a GroupNorm layer normalises with."""

    mean: torch.Tensor  # (G,) float64
    var: torch.Tensor  # (G,) float64


def channel_moments(x: torch.Tensor, region: tuple[slice, slice]) -> Moments:
    """Moments of x (1, C, H, W) over `region` (Welford per channel, then float64)."""
    xr = x[0, :, region[0], region[1]]  # (C, h, w) view
    c, h, w = xr.shape
    step = max(1, _CHUNK_ELEMS // max(1, h * w))
    means, sqs = [], []
    for i in range(0, c, step):
        part = xr[i:i + step].float()  # (c', h, w); a copy only for half dtypes
        var, mean = torch.var_mean(part, dim=(1, 2), correction=0)
        mean = mean.double().cpu()
        means.append(mean)
        sqs.append(var.double().cpu() + mean * mean)
    return Moments(h * w, torch.cat(means), torch.cat(sqs))


def pool(parts: list[Moments], groups: int) -> GroupStats:
    """Pool regions' channel moments into group stats: var = E[x^2] - E[x]^2 over the union."""
    total = sum(p.count for p in parts)
    mean_c = sum(p.mean * p.count for p in parts) / total  # (C,)
    sq_c = sum(p.sq * p.count for p in parts) / total  # (C,)
    mean_g = mean_c.view(groups, -1).mean(1)  # (G,) channels of a group have equal counts
    sq_g = sq_c.view(groups, -1).mean(1)
    return GroupStats(mean_g, (sq_g - mean_g * mean_g).clamp_min(0.0))


def torch_group_stats(x: torch.Tensor, groups: int) -> GroupStats:
    """The stats torch's GroupNorm would use for the whole of x (1, C, H, W)."""
    return pool([channel_moments(x, (slice(None), slice(None)))], groups)


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, stats: GroupStats) -> torch.Tensor:
    """norm(x) but with given stats: (x - mean) * rsqrt(var + eps) * weight + bias, per channel."""
    c = x.shape[1]
    per = c // norm.num_groups
    rstd = torch.rsqrt(stats.var + norm.eps).repeat_interleave(per)  # (C,) float64
    mean = stats.mean.repeat_interleave(per)
    scale = rstd
    shift = -mean * rstd
    if norm.affine:
        w = norm.weight.detach().double().cpu()
        scale = rstd * w
        shift = shift * w + norm.bias.detach().double().cpu()
    dev = x.device
    scale = scale.float().to(dev).view(1, c, 1, 1)
    shift = shift.float().to(dev).view(1, c, 1, 1)
    y = torch.addcmul(shift, x, scale)  # (1, C, H, W), float32 math like torch's kernel
    return y.to(x.dtype)
