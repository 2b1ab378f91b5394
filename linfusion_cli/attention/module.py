"""The LinFusion self-attention layer, a drop-in for a diffusers UNet's `attn1`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..figures import LINFUSION_DEFAULT_CHUNK, device_kind
from .ops import EPS, read_out, feature_map, linear_attention, merge_heads, split_heads


@dataclass
class KeyState:
    """Sum over tokens of (phi(k)^T v) / N and of phi(k), per head (fp32): all a query needs."""

    kv: torch.Tensor  # (B, h, d, d)
    k_sum: torch.Tensor  # (B, h, 1, d)
    count: int = 0  # tokens folded in


def _default_chunk(x: torch.Tensor) -> int:
    """Tokens per chunk when none is set (per device kind, figures.LINFUSION_DEFAULT_CHUNK)."""
    return LINFUSION_DEFAULT_CHUNK[device_kind(x.device)]


def nonlinear_projection(dim: int, mid_dim: int | None) -> nn.Sequential:
    """f(x) = Linear(C->m) -> LayerNorm(m) -> LeakyReLU(0.01) -> Linear(m->C), official indices 0..3."""
    mid = mid_dim or dim
    return nn.Sequential(nn.Linear(dim, mid), nn.LayerNorm(mid), nn.LeakyReLU(0.01), nn.Linear(mid, dim))


class LinFusionAttention(nn.Module):
    """q = W_q(x + f_q(x)), k = W_k(x + f_k(x)), v = W_v(x); normalised linear attention; W_o."""

    def __init__(self, dim: int, heads: int, projection_mid_dim: int | None = None,
                 chunk_size: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.projection_mid_dim = dim, heads, projection_mid_dim
        self.chunk_size = chunk_size  # tokens per chunk in the attention op; a memory knob
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.to_q_ = nonlinear_projection(dim, projection_mid_dim)
        self.to_k_ = nonlinear_projection(dim, projection_mid_dim)

    @classmethod
    def from_attention(cls, attn: nn.Module, projection_mid_dim: int | None = None) -> "LinFusionAttention":
        """A fresh layer that starts from a diffusers Attention's q/k/v/out weights (f_q = f_k = 0)."""
        dim = attn.to_q.in_features
        if attn.to_q.out_features != dim:
            raise ValueError(f"attention inner dim {attn.to_q.out_features} != query dim {dim}")
        layer = cls(dim, attn.heads, projection_mid_dim)
        ref = attn.to_q.weight
        layer.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for name in ("to_q", "to_k", "to_v"):
                getattr(layer, name).weight.copy_(getattr(attn, name).weight)
            layer.to_out[0].weight.copy_(attn.to_out[0].weight)
            layer.to_out[0].bias.copy_(attn.to_out[0].bias)
            for mlp in (layer.to_q_, layer.to_k_):  # zero last layer: x + f(x) == x at the start
                mlp[3].weight.zero_()
                mlp[3].bias.zero_()
        return layer

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states=None,
                attention_mask=None, **kwargs) -> torch.Tensor:
        """(B, N, C) -> (B, N, C). Self-attention only: context and masks are refused."""
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("LinFusionAttention is self-attention: no context or mask")
        x = hidden_states
        chunk = self.chunk_size or _default_chunk(x)
        if x.shape[1] > chunk:
            return self._forward_chunked(x, chunk)
        q = split_heads(self.to_q(x + self.to_q_(x)), self.heads)  # (B, h, N, d)
        k = split_heads(self.to_k(x + self.to_k_(x)), self.heads)
        v = split_heads(self.to_v(x), self.heads)
        o = linear_attention(q, k, v, chunk_size=self.chunk_size)  # (B, h, N, d)
        return self.to_out[1](self.to_out[0](merge_heads(o)))

    def _forward_chunked(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """Same result, O(chunk) working memory: projections and read-out run chunk by chunk.

        Pass 1 folds each chunk's k and v into the fp32 state; pass 2 reads each chunk's q out.
        x: (B, N, C) -> (B, N, C); only x and the output ever span all N tokens.
        """
        state = self.empty_state(x)
        self.accumulate(state, x, x.shape[1])
        return self.read(state, x, out=torch.empty_like(x))

    def empty_state(self, x: torch.Tensor) -> KeyState:
        """A zero key state for inputs like x (B, ., C)."""
        B, d = x.shape[0], self.dim // self.heads
        return KeyState(torch.zeros(B, self.heads, d, d, dtype=torch.float32, device=x.device),
                        torch.zeros(B, self.heads, 1, d, dtype=torch.float32, device=x.device))

    def accumulate(self, state: KeyState, x: torch.Tensor, n_total: int) -> None:
        """Fold the tokens x (B, n, C) into state; n_total is the whole image's token count.

        Pass 1 of a band-wise (or chunked) forward: the state is d x (d + 1) per head whatever n.
        """
        chunk = self.chunk_size or _default_chunk(x)
        scale = n_total ** -0.5
        for start in range(0, x.shape[1], chunk):
            x_c = x[:, start:start + chunk]  # (B, c, C)
            k_c = feature_map(split_heads(self.to_k(x_c + self.to_k_(x_c)), self.heads).float())
            v_c = split_heads(self.to_v(x_c), self.heads).float()  # (B, h, c, d)
            state.kv.add_((k_c * scale).transpose(-1, -2) @ (v_c * scale))
            state.k_sum.add_(k_c.sum(dim=-2, keepdim=True))
        state.count += x.shape[1]

    def read(self, state: KeyState, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Pass 2: the attention output for the tokens x (B, n, C) from the whole image's state."""
        chunk = self.chunk_size or _default_chunk(x)
        k_mean = state.k_sum / state.count
        if out is None and x.shape[1] <= chunk:  # one chunk (a band): its output, not a copy
            return self._read_chunk(state, x, k_mean)
        out = torch.empty_like(x) if out is None else out
        for start in range(0, x.shape[1], chunk):
            out[:, start:start + chunk] = self._read_chunk(state, x[:, start:start + chunk], k_mean)
        return out

    def _read_chunk(self, state: KeyState, x_c: torch.Tensor, k_mean: torch.Tensor) -> torch.Tensor:
        """read for one chunk of tokens x_c (B, c, C) -> (B, c, C)."""
        q_c = split_heads(self.to_q(x_c + self.to_q_(x_c)), self.heads)  # (B, h, c, d)
        return self.to_out[1](self.to_out[0](merge_heads(read_out(q_c, state.kv, k_mean, EPS))))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, projection_mid_dim={self.projection_mid_dim}"
