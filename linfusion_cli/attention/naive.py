"""Slow, obviously correct LinFusion attention, written token by token from the paper's formula.

Only for tests: it loops in Python over batch, heads and queries and works in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import EPS


def linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               eps: float = EPS) -> torch.Tensor:
    """o_i = sum_j w_ij v_j with w_ij = phi(q_i).phi(k_j)/N / (phi(q_i).mean_j phi(k_j) + eps).

    q, k, v: (B, h, N, d) -> (B, h, N, d) in q's dtype.
    """
    B, h, N, d = q.shape
    out = torch.empty(B, h, N, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for head in range(h):
            pq = F.elu(q[b, head].double()) + 1  # (N, d)
            pk = F.elu(k[b, head].double()) + 1  # (N, d)
            vv = v[b, head].double()  # (N, d)
            k_mean = pk.mean(dim=0)  # (d,)
            for i in range(N):
                weights = (pk @ pq[i]) / N  # (N,) unnormalised similarity of query i to each key
                out[b, head, i] = (weights @ vv) / (pq[i] @ k_mean + eps)
    return out.to(q.dtype)


def layer_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """A LinFusionAttention layer's forward, spelled out with the reference attention. x: (B, N, C)."""
    heads = layer.heads
    q = layer.to_q(x + layer.to_q_(x))
    k = layer.to_k(x + layer.to_k_(x))
    v = layer.to_v(x)
    B, N, C = q.shape

    def split(t):
        return t.view(B, N, heads, C // heads).transpose(1, 2)

    o = linear_attention_reference(split(q), split(k), split(v))
    o = o.transpose(1, 2).reshape(B, N, C)
    return layer.to_out[0](o)
