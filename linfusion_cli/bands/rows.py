"""Horizontal bands of (B, C, H, W) maps: row sources, convolutions and GroupNorm by band.

A band of output rows of a convolution needs only a band of its input rows plus a halo, and a
GroupNorm only needs the whole map's per-group moments, which sum over bands. With these two
facts every UNet layer can run band by band and give the whole-map result (up to float
summation order); see docs/band-wise.md. Shapes: maps are (B, C, H, W); rows index dim 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import staging, transfer


def band_ranges(height: int, rows: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] covering 0..height in bands of `rows` (the last may be shorter)."""
    rows = max(1, rows)
    return [(a, min(a + rows, height)) for a in range(0, height, rows)]


def whole_levels(band_rows: int | None, height: int) -> int:
    """Rows per band at full resolution: band_rows, or (None: one band per level) the latent's
    `height`, which level_rows halves to each level's height, so every level is one band."""
    return height if band_rows is None else band_rows


def level_rows(band_rows: int, level: int) -> int:
    """Rows per band at a UNet level (each level halves the height): ceil(band_rows / 2^level)."""
    return max(1, -(-band_rows // (1 << level)))


# ---------------------------------------------------------------- row sources

class Rows:
    """A (B, C, H, W) map that hands out rows [lo, hi) on request (-above <= lo < hi <= H + below).

    `above` / `below`: halo rows beyond the map's own that it can also hand out (a rank's
    neighbours' rows, received by linfusion_cli/parallel); rows beyond those are zeros.
    """

    batch: int
    channels: int
    height: int
    width: int
    above: int = 0
    below: int = 0

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        raise NotImplementedError

    def padded(self, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) with zeros for rows outside the map and its halo (a conv's zero padding)."""
        first, last = -self.above, self.height + self.below
        top, bottom = max(0, first - lo), max(0, hi - last)
        x = self.rows(max(lo, first), min(hi, last))
        return F.pad(x, (0, 0, top, bottom)) if top or bottom else x

    def prefetch(self, lo: int, hi: int) -> None:
        """Rows [lo, hi) will be asked next: a parked source starts bringing them (others have
        them at hand)."""

    def moments(self, ranges) -> "Moments":
        """The whole map's per-channel moments, from its bands (a source that knows them
        without reading its rows says so)."""
        m = Moments()
        for a, b in ranges:
            m.add(self.rows(a, b))
        return m


class Full(Rows):
    """A map held whole on the device."""

    def __init__(self, t: torch.Tensor):
        self.t = t
        self.batch, self.channels, self.height, self.width = t.shape

    def rows(self, lo, hi):
        return self.t[:, :, lo:hi]

    def add_residual(self, residual: torch.Tensor) -> None:
        """skip + residual (a ControlNet's), in place: the down path no longer reads the skip."""
        self.t.add_(residual.to(self.t.device))


class Host(Rows):
    """A map parked in host memory (skips_on_cpu, runtime/staging.py): rows come back to the
    device on request, those asked next already on their way (`prefetch`); `known`: its
    GroupNorm moments, taken on the device before it left, so that no pass fetches it for them."""

    def __init__(self, parked: staging.Parked, known: "Moments | None" = None):
        self.parked, self.known = parked, known
        self.batch, self.channels = parked.batch, parked.channels
        self.height, self.width = parked.height, parked.width

    def rows(self, lo, hi):
        return self.parked.rows(lo, hi)  # (B, C, hi - lo, W)

    def prefetch(self, lo, hi):
        self.parked.prefetch(max(lo, 0), min(hi, self.height))

    def moments(self, ranges):
        return self.known if self.known is not None else super().moments(ranges)


def park(t: torch.Tensor, stage: staging.Staging, rows: int,
         residual: torch.Tensor | None = None) -> Host:
    """t (B, C, H, W) parked band by band, `residual` (a ControlNet's, on the device or parked)
    added as diffusers adds it: each band's moments are taken on the device and the band copied
    out without blocking; the residual's next band comes in while this one is added."""
    ranges = band_ranges(t.shape[2], rows)
    out = stage.park(t.shape, t.dtype, t.device, like=t)
    more: Rows | None = None
    if residual is not None:  # a host residual (meta: the trace's host) is fetched band by band
        parked = transfer.is_host(residual) or residual.is_meta
        more = Host(stage.hold(residual, t.device)) if parked else Full(residual)
        more.prefetch(*ranges[0])
    m = Moments()
    for k, (a, b) in enumerate(ranges):
        band = t[:, :, a:b]  # (B, C, b - a, W)
        if more is not None:
            res = more.rows(a, b)
            if k + 1 < len(ranges):
                more.prefetch(*ranges[k + 1])
            band = band + res  # diffusers' skip + residual
            del res
        m.add(band)
        out.put(a, band)
        del band
    return Host(out, m)


class Cat(Rows):
    """torch.cat([a, b], dim=1) of two sources, band by band (an up block's resnet input)."""

    def __init__(self, a: Rows, b: Rows):
        self.a, self.b = a, b
        self.batch, self.height, self.width = a.batch, a.height, a.width
        self.channels = a.channels + b.channels
        self.above, self.below = min(a.above, b.above), min(a.below, b.below)

    def rows(self, lo, hi):
        return torch.cat([self.a.rows(lo, hi), self.b.rows(lo, hi)], dim=1)

    def prefetch(self, lo, hi):
        self.a.prefetch(lo, hi)
        self.b.prefetch(lo, hi)

    def moments(self, ranges):
        return Moments.cat(self.a.moments(ranges), self.b.moments(ranges))


class Upsampled(Rows):
    """diffusers' Upsample2D (nearest to `size`, then its conv) of a low-resolution map, computed
    for the rows asked, on every read (blocks.upsample reads each row once, into a whole map).
    `low` may carry halo rows (a rank's band of the map): the upsampled rows at the band's
    edges, whose conv reads nearest rows beyond it, can then be computed too."""

    def __init__(self, low: "torch.Tensor | Rows", upsampler: nn.Module,
                 size: tuple[int, int] | None = None):
        check_upsampler(upsampler)
        self.low, self.up = (Full(low) if torch.is_tensor(low) else low), upsampler
        b, c, h, w = self.low.batch, self.low.channels, self.low.height, self.low.width
        self.batch, self.channels = b, c
        self.height, self.width = size if size is not None else (2 * h, 2 * w)
        assert self.height in (2 * h, 2 * h - 1), "nearest row map is i // 2 only for x2 sizes"

    def _nearest(self, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of F.interpolate(low, size, mode="nearest") (no conv)."""
        # nearest maps output row i to floor(i * h / H); for H = 2h or 2h - 1 that is i // 2
        src_lo, src_hi = lo // 2, (hi - 1) // 2 + 1
        band = self.low.rows(src_lo, src_hi)
        up = F.interpolate(band, size=(2 * (src_hi - src_lo), self.width), mode="nearest")
        return up[:, :, lo - 2 * src_lo:hi - 2 * src_lo]

    def rows(self, lo, hi):
        conv = self.up.conv if self.up.name == "conv" else self.up.Conv2d_0
        src = Computed(self.batch, self.channels, self.height, self.width, self._nearest,
                       2 * self.low.above, 2 * self.low.below)
        return conv_rows(conv, src, lo, hi)


class Computed(Rows):
    """Rows produced by a function (lo, hi) -> tensor (with `above` / `below` halo rows)."""

    def __init__(self, batch, channels, height, width, fn, above: int = 0, below: int = 0):
        self.batch, self.channels, self.height, self.width, self.fn = batch, channels, height, width, fn
        self.above, self.below = above, below

    def rows(self, lo, hi):
        return self.fn(lo, hi)


def mapped(src: Rows, fn, channels: int | None = None) -> Rows:
    """src with a row-wise function applied to every band it hands out (a norm + activation)."""
    return Computed(src.batch, src.channels if channels is None else channels, src.height, src.width,
                    lambda lo, hi: fn(src.rows(lo, hi)), src.above, src.below)


class Halo(Rows):
    """A map's own rows plus halo rows above (B, C, t, W) and below (B, C, u, W) it."""

    def __init__(self, src: Rows, top: torch.Tensor, bottom: torch.Tensor):
        self.src, self.top, self.bottom = src, top, bottom
        self.batch, self.channels, self.height, self.width = src.batch, src.channels, src.height, src.width
        self.above, self.below = top.shape[2], bottom.shape[2]

    def rows(self, lo, hi):
        h, parts = self.height, []
        if lo < 0:
            parts.append(self.top[:, :, self.above + lo:self.above + min(hi, 0)])
        if hi > 0 and lo < h:
            parts.append(self.src.rows(max(lo, 0), min(hi, h)))
        if hi > h:
            parts.append(self.bottom[:, :, max(lo, h) - h:hi - h])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def prefetch(self, lo, hi):
        if hi > 0 and lo < self.height:
            self.src.prefetch(max(lo, 0), min(hi, self.height))


def low_halo(up: nn.Module) -> tuple[int, int]:
    """(rows above, rows below) of the low-resolution band that Upsampled needs to compute the
    upsampled band's own rows (its conv reads nearest rows -p .. h - 1 + (k - 1) d - p)."""
    conv = up.conv if up.name == "conv" else up.Conv2d_0
    base = getattr(conv, "base_layer", conv)
    (k, _), (p, _), (d, _) = base.kernel_size, base.padding, base.dilation
    return (p + 1) // 2, max(0, ((k - 1) * d - p + 1) // 2)


def check_upsampler(up: nn.Module) -> None:
    """Refuse Upsample2D variants whose forward Upsampled does not reproduce."""
    if getattr(up, "norm", None) is not None or getattr(up, "use_conv_transpose", False) \
            or not getattr(up, "interpolate", True) or not getattr(up, "use_conv", True):
        raise ValueError("band-wise UNet supports nearest-x2 + conv upsamplers only")


# ---------------------------------------------------------------- convolution by rows

def conv_rows(conv: nn.Module, src: Rows, a: int, b: int) -> torch.Tensor:
    """Output rows [a, b) of conv(src) as if src were whole, from src's rows plus the halo.

    Output row r reads input rows r*s - p + j*d (j < k). A plain nn.Conv2d runs on exactly
    those rows (zero rows outside the map) with no row padding; any other module that wraps a
    conv (a peft LoRA layer) is called as is on a slice whose extra rows absorb its own padding,
    and the surplus output rows are cropped.
    """
    base = getattr(conv, "base_layer", conv)
    (s, _), (p, pw) = base.stride, base.padding
    if base.padding_mode != "zeros":
        raise ValueError("band-wise convolution needs zero padding")
    lo, hi = conv_window(conv, a, b)
    if type(conv) is nn.Conv2d:
        x = src.padded(lo, hi)
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, (0, pw), conv.dilation, conv.groups)
    out = conv(src.padded(lo, hi))
    first = (a * s - lo) // s  # the module's own padding rows, and the extra ones on top
    return out[:, :, first:first + (b - a)]


def conv_window(conv: nn.Module, a: int, b: int) -> tuple[int, int]:
    """Input rows [lo, hi) that conv_rows reads for output rows [a, b) (zeros beyond the map).
    A module that wraps the conv gets e extra rows on top, so that its own padding lands on a
    stride step."""
    base = getattr(conv, "base_layer", conv)
    (k, _), (s, _), (p, _), (d, _) = base.kernel_size, base.stride, base.padding, base.dilation
    lo, hi = a * s - p, (b - 1) * s - p + (k - 1) * d + 1
    return (lo, hi) if type(conv) is nn.Conv2d else (lo - (-p) % s, hi)


# ---------------------------------------------------------------- GroupNorm by bands

class Moments:
    """Per-sample, per-channel count, sum and sum of squares, accumulated band by band (float64)."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: torch.Tensor | None = None  # (B, C) float64
        self.sq: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Fold in a band x (B, C, h, w): float32 var_mean per channel, on an eighth of the
        channels at a time below float32, so that the band is never copied whole to float32."""
        step = x.shape[1] if x.dtype == torch.float32 else max(1, -(-x.shape[1] // 8))
        parts = [torch.var_mean(c.float(), dim=(2, 3), correction=0) for c in x.split(step, dim=1)]
        var, mean = (torch.cat(p, dim=1) for p in zip(*parts))  # (B, C) each
        del parts
        n = x.shape[2] * x.shape[3]
        mean = mean.double()
        s, sq = mean * n, (var.double() + mean * mean) * n
        if self.sum is None:
            self.sum, self.sq = s, sq
        else:
            self.sum, self.sq = self.sum + s, self.sq + sq
        self.count += n

    @staticmethod
    def cat(a: "Moments", b: "Moments") -> "Moments":
        """The moments of torch.cat([x, y], dim=1) from x's and y's (the same rows)."""
        assert a.count == b.count, (a.count, b.count)
        m = Moments()
        m.count, m.sum, m.sq = a.count, torch.cat([a.sum, b.sum], 1), torch.cat([a.sq, b.sq], 1)
        return m

    def affine(self, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (B, C, 1, 1) float32, with norm(x) == x * scale + shift."""
        b, c = self.sum.shape
        g = norm.num_groups
        mean = (self.sum / self.count).view(b, g, -1).mean(2)  # (B, G)
        sq = (self.sq / self.count).view(b, g, -1).mean(2)
        rstd = torch.rsqrt((sq - mean * mean).clamp_min(0.0) + norm.eps)
        rstd_c = rstd.repeat_interleave(c // g, dim=1)  # (B, C)
        mean_c = mean.repeat_interleave(c // g, dim=1)
        scale, shift = rstd_c, -mean_c * rstd_c
        if norm.affine:
            w, bias = norm.weight.double(), norm.bias.double()
            scale, shift = scale * w, shift * w + bias
        return scale.float().view(b, c, 1, 1), shift.float().view(b, c, 1, 1)


def group_norm_affine(norm: nn.GroupNorm, src: Rows, ranges,
                      comm=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole map's GroupNorm as (scale, shift), from one pass over src's bands or the
    moments src already knows (and, with a band-parallel `comm`, the other ranks' bands: their
    moments summed in)."""
    if not isinstance(norm, nn.GroupNorm):
        raise ValueError(f"band-wise execution needs GroupNorm, not {type(norm).__name__}")
    return reduced(src.moments(ranges), comm).affine(norm)


def reduced(m: Moments, comm) -> Moments:
    """m summed over every rank's band (comm.moments), or m itself in one process."""
    return m if comm is None else comm.moments(m)


def normed(x: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x * scale + shift in float32, back in x's dtype (what torch's GroupNorm kernel does)."""
    scale, shift = affine
    return torch.addcmul(shift, x, scale).to(x.dtype)
