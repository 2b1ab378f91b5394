"""The VAE mid-block's global self-attention without an N x N tensor, windowed past a token limit."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..bands.rows import Full, band_ranges, group_norm_affine, normed
from ..tuning import VAE_ATTN_TOKEN_LIMIT, device_kind
from .tiles import tile_grid

_SCORE_BYTES = 256 << 20  # query chunk so that one chunk's scores stay under this


def default_token_limit(device: torch.device) -> int:
    """Exact global attention up to this many tokens (tuning.VAE_ATTN_TOKEN_LIMIT)."""
    return VAE_ATTN_TOKEN_LIMIT[device_kind(torch.device(device))]


def _sdpa_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA split over queries: same rows as one call, scores never (N x N) at once."""
    # q: (B, heads, Nq, d); k, v: (B, heads, Nk, d)
    n_q, n_k = q.shape[2], k.shape[2]
    step = max(1024, _SCORE_BYTES // (4 * n_k * q.shape[1]))
    if n_q <= step:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = torch.empty_like(q)
    for i in range(0, n_q, step):
        out[:, :, i:i + step] = F.scaled_dot_product_attention(
            q[:, :, i:i + step], k, v, dropout_p=0.0, is_causal=False)
    return out


def _check(attn) -> None:
    """Refuse attention variants whose maths this module does not reproduce."""
    for name in ("spatial_norm", "norm_q", "norm_k"):
        if getattr(attn, name, None) is not None:
            raise ValueError(f"VAE attention with {name} is not supported by the tiled VAE")


def mid_attention(attn, x: torch.Tensor, *, token_limit: int, window: int = 128,
                  overlap: int = 32, band_rows: int = 0) -> tuple[torch.Tensor, bool]:
    """diffusers' AttnProcessor2_0 on x (1, C, H, W); returns (out, exact).

    Up to `token_limit` tokens it is the exact global attention (query-chunked). Beyond, each
    `window`^2 block (cores overlapping by `overlap`, cropped) attends only to itself, and its
    q/k/v are projected per window so no whole-map q/k/v ever exist. With band_rows > 0 the
    windows are normalised on demand (`_windowed_banded`): no whole normalised copy either.
    """
    _check(attn)
    b, c, h, w = x.shape
    exact = h * w <= token_limit
    if band_rows > 0 and not exact:
        return _windowed_banded(attn, x, window, overlap, band_rows), False
    hs = x.reshape(b, c, h * w)  # (B, C, N); x may be channels_last
    if attn.group_norm is not None:
        hs = attn.group_norm(hs)  # global statistics: exact
    hs = hs.transpose(1, 2)  # (B, N, C)
    out = _attend(attn, hs) if exact else _windowed(attn, hs, b, h, w, window, overlap)
    del hs
    out = out.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        out = out + x
    return out / attn.rescale_output_factor, exact


def _attend(attn, hs: torch.Tensor) -> torch.Tensor:
    """Projections, query-chunked SDPA and the output projection: (B, N, C) -> (B, N, C)."""
    b = hs.shape[0]
    q, k, v = attn.to_q(hs), attn.to_k(hs), attn.to_v(hs)  # (B, N, inner)
    d = k.shape[-1] // attn.heads

    def split(t):  # (B, N, inner) -> (B, heads, N, d)
        return t.view(b, -1, attn.heads, d).transpose(1, 2)

    o = _sdpa_chunked(split(q), split(k), split(v))  # (B, heads, N, d)
    del q, k, v
    o = o.transpose(1, 2).reshape(b, -1, attn.heads * d).to(hs.dtype)
    return attn.to_out[1](attn.to_out[0](o))


def _windowed(attn, hs, b, h, w, window, overlap):
    """Attention inside overlapping windows, each window's core written once. hs: (B, N, C)."""
    c = hs.shape[-1]
    grid = hs.reshape(b, h, w, c)  # (B, H, W, C)
    out = torch.empty_like(grid)
    for tile in tile_grid(h, w, max(1, window - overlap), overlap // 2):
        ys, xs = tile.window_slices()
        hh, ww = tile.y.win_len, tile.x.win_len
        o = _attend(attn, grid[:, ys, xs].reshape(b, hh * ww, c)).view(b, hh, ww, c)
        cy, cx = tile.crop_slices()
        out[:, tile.core_slices()[0], tile.core_slices()[1]] = o[:, cy, cx]
    return out.view(b, h * w, c)


def _windowed_banded(attn, x: torch.Tensor, window: int, overlap: int, rows: int) -> torch.Tensor:
    """`_windowed` plus the residual, holding only x, the output map and one window: GroupNorm
    from band moments, each window normalised when it is attended. x: (B, C, H, W)."""
    b, c, h, w = x.shape
    affine = None
    if attn.group_norm is not None:
        affine = group_norm_affine(attn.group_norm, Full(x), band_ranges(h, rows))
    out = torch.empty_like(x)  # (B, C, H, W), the residual sum in place
    for tile in tile_grid(h, w, max(1, window - overlap), overlap // 2):
        ys, xs = tile.window_slices()
        hh, ww = tile.y.win_len, tile.x.win_len
        hs = x[:, :, ys, xs] if affine is None else normed(x[:, :, ys, xs], affine)
        hs = hs.permute(0, 2, 3, 1).reshape(b, hh * ww, c)  # (B, n, C)
        o = _attend(attn, hs).view(b, hh, ww, c)
        del hs
        (cy, cx), (oy, ox) = tile.crop_slices(), tile.core_slices()
        o = o[:, cy, cx].permute(0, 3, 1, 2)  # (B, C, core h, core w)
        if attn.residual_connection:
            o = o + x[:, :, oy, ox]
        out[:, :, oy, ox] = o / attn.rescale_output_factor
        del o
    return out
