"""Pure tensor functions of LinFusion's normalised linear attention (no modules, no state).

Shapes: q, k, v are (B, h, N, d): batch, heads, tokens, head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-4
# Tokens per chunk when the caller does not choose: large enough that the matmuls stay
# efficient, small enough that the fp32 copies of one chunk are a few hundred MB at most.
DEFAULT_CHUNK = 1 << 16


def feature_map(t: torch.Tensor) -> torch.Tensor:
    """phi(t) = elu(t) + 1: a positive kernel feature map, so the implied weights are >= 0."""
    return F.elu(t) + 1.0


def kv_state(k: torch.Tensor, v: torch.Tensor, chunk_size: int | None = None):
    """Summaries of keys and values: (phi(k)^T/sqrt(N)) @ (v/sqrt(N)) and mean_N phi(k), in fp32.

    k, v: (B, h, N, d) -> kv: (B, h, d, d) fp32, k_mean: (B, h, 1, d) fp32. Tokens are consumed in
    chunks so the fp32 copies never cover the whole sequence.
    """
    B, h, N, d = k.shape
    chunk = chunk_size or DEFAULT_CHUNK
    scale = N ** -0.5
    kv = torch.zeros(B, h, d, v.shape[-1], dtype=torch.float32, device=k.device)
    k_sum = torch.zeros(B, h, 1, d, dtype=torch.float32, device=k.device)
    for start in range(0, N, chunk):
        k_c = feature_map(k[:, :, start:start + chunk].float())  # (B, h, c, d)
        v_c = v[:, :, start:start + chunk].float()  # (B, h, c, d)
        kv.add_((k_c * scale).transpose(-1, -2) @ (v_c * scale))
        k_sum.add_(k_c.sum(dim=-2, keepdim=True))
    return kv, k_sum / N


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     chunk_size: int | None = None, eps: float = EPS) -> torch.Tensor:
    """LinFusion attention, O(N d^2): never builds an N x N tensor; state kept in fp32.

    q, k, v: (B, h, N, d) -> (B, h, N, d) in q's dtype.
    """
    kv, k_mean = kv_state(k, v, chunk_size)  # (B, h, d, d), (B, h, 1, d)
    N = q.shape[-2]
    chunk = chunk_size or DEFAULT_CHUNK
    if N <= chunk:
        return read_out(q, kv, k_mean, eps)
    out = torch.empty_like(q)
    for start in range(0, N, chunk):
        out[:, :, start:start + chunk] = read_out(q[:, :, start:start + chunk], kv, k_mean, eps)
    return out


def read_out(q: torch.Tensor, kv: torch.Tensor, k_mean: torch.Tensor, eps: float) -> torch.Tensor:
    """o = phi(q) @ kv / (phi(q) @ k_mean^T + eps) for one chunk of queries (B, h, c, d)."""
    q_c = feature_map(q.float())  # (B, h, c, d)
    numerator = q_c @ kv  # (B, h, c, d)
    denominator = q_c @ k_mean.transpose(-1, -2) + eps  # (B, h, c, 1)
    return (numerator / denominator).to(q.dtype)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, h, N, C/h)."""
    B, N, C = x.shape
    return x.view(B, N, heads, C // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) -> (B, N, h*d)."""
    B, h, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, h * d)
