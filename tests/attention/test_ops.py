"""Fast LinFusion attention vs the slow reference, and the layer vs its spelled-out forward."""

import pytest
import torch

from linfusion_cli.attention.module import LinFusionAttention
from linfusion_cli.attention.naive import layer_reference, linear_attention_reference
from linfusion_cli.attention.ops import linear_attention

SHAPES = [(1, 1, 1, 4), (2, 8, 37, 8), (3, 2, 129, 16), (2, 4, 255, 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk", [None, 7, 64])
def test_fast_matches_reference_fp32(shape, chunk):
    q, k, v = (torch.randn(shape) for _ in range(3))
    fast = linear_attention(q, k, v, chunk_size=chunk)
    ref = linear_attention_reference(q, k, v)
    assert fast.shape == shape and fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_fast_matches_reference_half(shape, dtype):
    q, k, v = (torch.randn(shape).to(dtype) for _ in range(3))
    fast = linear_attention(q, k, v, chunk_size=50)
    assert fast.dtype == dtype
    ref = linear_attention_reference(q.float(), k.float(), v.float())
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(fast.float(), ref, rtol=tol, atol=tol)


def test_half_precision_does_not_overflow_at_many_tokens():
    # 2^18 tokens of large keys/values: an fp16 k^T v state without 1/sqrt(N) would overflow.
    N = 1 << 18
    q = torch.full((1, 1, N, 4), 3.0, dtype=torch.float16)
    k = torch.full((1, 1, N, 4), 3.0, dtype=torch.float16)
    v = torch.full((1, 1, N, 4), 200.0, dtype=torch.float16)
    out = linear_attention(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), torch.full_like(out.float(), 200.0), rtol=1e-3, atol=0.5)


def test_weights_sum_to_one_output_of_constant_values_is_constant():
    q, k = torch.randn(2, 3, 50, 8), torch.randn(2, 3, 50, 8)
    v = torch.ones(2, 3, 50, 8) * 5
    torch.testing.assert_close(linear_attention(q, k, v), v, rtol=1e-3, atol=1e-3)


def test_chunking_never_builds_n_by_n(monkeypatch):
    """Every intermediate of the fast path is O(N): record the largest tensor it allocates."""
    import linfusion_cli.attention.ops as ops

    N, seen = 4096, []
    real_fm = ops.feature_map
    monkeypatch.setattr(ops, "feature_map", lambda t: seen.append(t.numel()) or real_fm(t))
    q, k, v = (torch.randn(1, 2, N, 8) for _ in range(3))
    linear_attention(q, k, v, chunk_size=1024)
    assert max(seen) == 2 * 1024 * 8  # one chunk per call, never N x N (= 2 * 16.7M)


@pytest.mark.parametrize("mid", [None, 4])
@pytest.mark.parametrize("tokens", [1, 17, 64])
def test_layer_matches_reference_layer(mid, tokens):
    layer = LinFusionAttention(32, 4, projection_mid_dim=mid).eval()
    for p in layer.parameters():  # random MLPs so the nonlinear projections matter
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, tokens, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer_reference(layer, x), rtol=1e-5, atol=1e-5)


def test_layer_refuses_context():
    layer = LinFusionAttention(16, 2)
    with pytest.raises(ValueError):
        layer(torch.randn(1, 4, 16), encoder_hidden_states=torch.randn(1, 3, 16))


@pytest.mark.parametrize("tokens,chunk", [(100, 7), (64, 64), (257, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_layer_equals_unchunked_layer(tokens, chunk, dtype):
    layer = LinFusionAttention(32, 4, projection_mid_dim=8).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    layer.to(dtype)
    x = torch.randn(2, tokens, 32).to(dtype)
    with torch.no_grad():
        whole = layer(x)
        layer.chunk_size = chunk
        chunked = layer(x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(chunked.float(), whole.float(), rtol=tol, atol=tol)
