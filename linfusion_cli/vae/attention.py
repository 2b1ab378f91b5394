"""The VAE mid-block's global self-attention without an N x N tensor, windowed past a token limit."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..bands.rows import Full, band_ranges, group_norm_affine, normed
from ..figures import ATTENTION_OVERLAP, ATTENTION_WINDOW, VAE_ATTN_SCORE_BYTES, \
    VAE_ATTN_TOKEN_LIMIT, device_kind
from .tiles import tile_grid, window_halo


def default_token_limit(device: torch.device) -> int:
    """Exact global attention up to this many tokens (figures.VAE_ATTN_TOKEN_LIMIT)."""
    return VAE_ATTN_TOKEN_LIMIT[device_kind(torch.device(device))]


def query_chunk(kind: str, n_q: int, n_k: int, heads: int, fused: bool,
                score_bytes: int | None = None) -> int:
    """Queries per SDPA call on a `kind` ("cuda"/"cpu") device: all of them where a fused
    kernel never holds the scores (CUDA's flash / memory-efficient: one launch, K and V read
    once per query block, not once per chunk), else as many as keep one call's fp32 scores
    (heads x chunk x n_k) under score_bytes (figures.VAE_ATTN_SCORE_BYTES: the math path)."""
    if kind == "cuda" and fused:
        return max(1, n_q)
    budget = VAE_ATTN_SCORE_BYTES[kind] if score_bytes is None else score_bytes
    return max(1, min(n_q, budget // (4 * heads * max(1, n_k))))


def fused_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether torch would run SDPA on these CUDA tensors with a kernel that holds no N x N
    scores (flash or memory-efficient); False off CUDA or when torch cannot say."""
    if q.device.type != "cuda":
        return False
    try:
        from torch.backends import cuda as sdp

        params = sdp.SDPAParams(q, k, v, None, 0.0, False, False)
        return bool(sdp.can_use_flash_attention(params) or sdp.can_use_efficient_attention(params))
    except (AttributeError, TypeError, RuntimeError):  # an older torch's signature: chunk safely
        return False


def _sdpa_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  score_bytes: int | None = None) -> torch.Tensor:
    """SDPA in as few calls as the device allows (query_chunk): the same rows as one call,
    scores never (N x N) at once on a path that materialises them."""
    # q: (B, heads, Nq, d); k, v: (B, heads, Nk, d)
    n_q, n_k = q.shape[2], k.shape[2]
    step = query_chunk(device_kind(q.device), n_q, n_k, q.shape[1], fused_sdpa(q, k, v),
                       score_bytes)
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


def mid_attention(attn, x: torch.Tensor, *, token_limit: int, window: int = ATTENTION_WINDOW,
                  overlap: int = ATTENTION_OVERLAP, band_rows: int = 0, comm=None) -> tuple[torch.Tensor, bool]:
    """diffusers' AttnProcessor2_0 on x (1, C, H, W); returns (out, exact).

    Up to `token_limit` tokens it is the exact global attention (query-chunked). Beyond, each
    `window`^2 block (cores overlapping by `overlap`, cropped) attends only to itself, and its
    q/k/v are projected per window so no whole-map q/k/v ever exist. With band_rows > 0 the
    windows are normalised on demand (`_windowed_banded`): no whole normalised copy either.
    With a band-parallel `comm` (linfusion_cli.parallel, handed in), x and the output are this
    rank's rows [comm.a, comm.b) of a map comm.height rows tall: see `_shared`.
    """
    _check(attn)
    b, c, h, w = x.shape
    if comm is not None:
        return _shared(attn, x, token_limit, window, overlap, band_rows or h, comm)
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


def _heads(attn, t: torch.Tensor) -> torch.Tensor:
    """(B, N, inner) -> (B, heads, N, d), a view."""
    return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


def _merge(attn, o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """SDPA's (B, heads, N, d) through the output projection: (B, N, C)."""
    o = o.transpose(1, 2).reshape(o.shape[0], -1, o.shape[1] * o.shape[3]).to(dtype)
    return attn.to_out[1](attn.to_out[0](o))


def _attend(attn, hs: torch.Tensor) -> torch.Tensor:
    """Projections, query-chunked SDPA and the output projection: (B, N, C) -> (B, N, C)."""
    q, k, v = attn.to_q(hs), attn.to_k(hs), attn.to_v(hs)  # (B, N, inner)
    o = _sdpa_chunked(_heads(attn, q), _heads(attn, k), _heads(attn, v))  # (B, heads, N, d)
    del q, k, v
    return _merge(attn, o, hs.dtype)


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


def _affine(attn, x: torch.Tensor, rows: int, comm=None):
    """The attention's GroupNorm as (scale, shift) from band moments (every rank's, with comm)."""
    if attn.group_norm is None:
        return None
    return group_norm_affine(attn.group_norm, Full(x), band_ranges(x.shape[2], rows), comm)


def _windowed_banded(attn, x: torch.Tensor, window: int, overlap: int, rows: int,
                     comm=None) -> torch.Tensor:
    """`_windowed` plus the residual, holding only x, the output map and one window: GroupNorm
    from band moments, each window normalised when it is attended. x: (B, C, H, W).
    With comm, x is a rank's band: it runs the windows whose cores meet the band and writes
    their cores' rows in it, reading the windows' other rows from the neighbours (one halo)."""
    b, c, h, w = x.shape
    start, height = (0, h) if comm is None else (comm.a, comm.height)
    windows = tile_grid(height, w, max(1, window - overlap), overlap // 2)
    affine = _affine(attn, x, rows, comm)
    mine = [t for t in windows if t.y.core0 < start + h and t.y.core1 > start]
    src = Full(x)
    if comm is not None:  # the same halo on every rank (each works out what the others need)
        src = comm.halo(src, *window_halo(windows, comm.parts))
    out = torch.empty_like(x)  # (B, C, H, W), the residual sum in place
    for tile in mine:
        xs = tile.window_slices()[1]
        hh, ww = tile.y.win_len, tile.x.win_len
        hs = src.rows(tile.y.win0 - start, tile.y.win1 - start)[:, :, :, xs]
        hs = hs if affine is None else normed(hs, affine)
        hs = hs.permute(0, 2, 3, 1).reshape(b, hh * ww, c)  # (B, n, C)
        o = _attend(attn, hs).view(b, hh, ww, c)
        del hs
        y0, y1 = max(tile.y.core0, start), min(tile.y.core1, start + h)  # the core's rows in the band
        oy, ox = slice(y0 - start, y1 - start), tile.core_slices()[1]
        o = o[:, y0 - tile.y.win0:y1 - tile.y.win0, tile.crop_slices()[1]].permute(0, 3, 1, 2)
        if attn.residual_connection:
            o = o + x[:, :, oy, ox]
        out[:, :, oy, ox] = o / attn.rescale_output_factor  # (B, C, core rows, core w)
        del o
    return out


def _shared(attn, x: torch.Tensor, token_limit: int, window: int, overlap: int, rows: int,
            comm) -> tuple[torch.Tensor, bool]:
    """mid_attention over ranks on this rank's band x (1, C, h, W) of the map: the same windows
    as one process (windowed), or the band's queries against the whole map's keys and values,
    which each rank projects for its own rows and all-gathers (exact, 2 C per token)."""
    if comm.height * x.shape[3] > token_limit:
        return _windowed_banded(attn, x, window, overlap, rows, comm), False
    b, c, h, w = x.shape
    if b != 1:
        raise ValueError(f"band-parallel VAE attention takes one map, got a batch of {b}")
    affine = _affine(attn, x, rows, comm)
    ranges = band_ranges(h, rows)

    def tokens(lo, hi):  # (1, n, C) normalised tokens of band rows [lo, hi)
        t = x[:, :, lo:hi] if affine is None else normed(x[:, :, lo:hi], affine)
        return t.permute(0, 2, 3, 1).reshape(1, (hi - lo) * w, c)

    kv = None  # (h, W, 2 inner): this rank's keys and values, then the whole map's
    for lo, hi in ranges:
        hs = tokens(lo, hi)
        part = torch.cat([attn.to_k(hs), attn.to_v(hs)], dim=-1)  # (1, n, 2 inner)
        if kv is None:
            kv = part.new_empty(h, w, part.shape[-1])
        kv[lo:hi] = part.view(hi - lo, w, -1)
        del hs, part
    kv = comm.gather(kv).flatten(0, 1)  # (H W, 2 inner)
    inner = kv.shape[-1] // 2
    k, v = _heads(attn, kv[None, :, :inner]), _heads(attn, kv[None, :, inner:])
    out = torch.empty_like(x)
    for lo, hi in ranges:
        hs = tokens(lo, hi)
        o = _merge(attn, _sdpa_chunked(_heads(attn, attn.to_q(hs)), k, v), hs.dtype)  # (1, n, C)
        del hs
        o = o.view(1, hi - lo, w, c).permute(0, 3, 1, 2)
        if attn.residual_connection:
            o = o + x[:, :, lo:hi]
        out[:, :, lo:hi] = o / attn.rescale_output_factor
        del o
    return out, True
