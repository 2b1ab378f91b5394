"""Exact mode's paused tiles: on the device within the device budget, parked (pinned host buffers,
through runtime.transfer) beyond it, with the same result and bytes counted from shapes; the
GroupNorm statistics never leave the device; the mid attention's SDPA chunking (tiny VAE, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.synthetic import structured_image, structured_latent
from linfusion_cli.runtime import transfer
from linfusion_cli.figures import DECODER_CONTEXT, ENCODER_CONTEXT
from linfusion_cli.vae import attention as attn_mod
from linfusion_cli.vae import decode, encode, tile_grid
from linfusion_cli.vae.drive import shared_pool
from linfusion_cli.vae.norm import channel_moments, group_norm, pool, torch_group_stats
from linfusion_cli.vae.parking import Lot

from ..model_helpers import tiny_vae

H, W, TILE_PX = 40, 56, 128  # latent px; 16 latent px tiles: 3 x 4 of them
FP32 = 4


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture(scope="module")
def latent():
    return structured_latent(H, W, seed=1)  # (1, 4, H, W)


@pytest.fixture(scope="module")
def image():
    return structured_image(H * 8, W * 8, seed=2)  # (8H, 8W, 3) uint8


class Traffic:
    """transfer's observer: bytes each way and the copies' count."""

    def __init__(self):
        self.bytes = {"d2h": 0, "h2d": 0}
        self.copies = 0

    def __call__(self, direction: str, n: int, blocking: bool) -> None:
        self.bytes[direction] += n
        self.copies += 1


def _run(fn, *args, **kwargs):
    """fn's result, its one TileReport and the traffic through transfer while it ran."""
    reports, seen = [], Traffic()
    with transfer.observed(seen):
        out = fn(*args, on_report=reports.append, **kwargs)
    (report,) = reports
    return out, report, seen


# ---------------------------------------------------------------- bytes from shapes alone
def _decoder_gn_elements_per_px(dec) -> int:
    """Elements a tile parks per latent px of its window, summed over the tiled path's GroupNorms:
    a resnet parks its input at norm1, its input and hidden map at norm2; conv_norm_out its input."""
    first = next(i for i, blk in enumerate(dec.up_blocks) if blk.upsamplers)
    scale, total = 2, 0  # the tiled path starts after the first up block's upsampler
    for blk in dec.up_blocks[first + 1:]:
        for r in blk.resnets:
            total += (r.in_channels + r.in_channels + r.out_channels) * scale * scale
        if blk.upsamplers:
            scale *= 2
    return total + dec.conv_norm_out.num_channels * scale * scale


def _encoder_gn_elements_per_px(enc, f: int) -> int:
    """The same for the encoder's tiled path (down blocks up to the last that downsamples)."""
    last = max(i for i, blk in enumerate(enc.down_blocks) if blk.downsamplers)
    scale, total = f, 0  # image resolution: f^2 image px per latent px
    for blk in enc.down_blocks[:last + 1]:
        for r in blk.resnets:
            total += (r.in_channels + r.in_channels + r.out_channels) * scale * scale
        if blk.downsamplers:
            scale //= 2
    return total


def _area(context: int) -> int:
    return sum(t.window_area for t in tile_grid(H, W, TILE_PX // 8, context))


# ---------------------------------------------------------------- parked == on the device
def test_parked_decode_equals_unparked_and_moves_what_the_shapes_say(vae, latent):
    kw = dict(tile_px=TILE_PX, mode="exact")
    want, kept, none = _run(decode, vae, latent, **kw)
    got, parked, seen = _run(decode, vae, latent, device_budget=0, **kw)
    assert np.array_equal(got, want)  # copies are exact
    assert none.bytes == {"d2h": 0, "h2d": 0} and not kept.parked and kept.parked_bytes == 0
    assert kept.device_budget_bytes is None  # CPU: no limit unless given
    expected = _decoder_gn_elements_per_px(vae.decoder) * _area(DECODER_CONTEXT) * FP32
    assert parked.parked and parked.device_budget_bytes == 0
    assert seen.bytes["d2h"] == seen.bytes["h2d"] == parked.parked_bytes == expected > 0
    assert parked.to_dict()["parked_bytes"] == expected and "ranks" not in parked.to_dict()


def test_parked_encode_equals_unparked_and_moves_what_the_shapes_say(vae, image):
    kw = dict(tile_px=TILE_PX, mode="exact")
    want, _, none = _run(encode, vae, image, **kw)
    got, parked, seen = _run(encode, vae, image, device_budget=0, **kw)
    assert torch.equal(got, want)
    assert none.bytes == {"d2h": 0, "h2d": 0}
    expected = _encoder_gn_elements_per_px(vae.encoder, 8) * _area(ENCODER_CONTEXT) * FP32
    assert seen.bytes["d2h"] == seen.bytes["h2d"] == parked.parked_bytes == expected > 0


def test_a_budget_between_keeps_some_tiles_on_the_device(vae, latent):
    kw = dict(tile_px=TILE_PX, mode="exact")
    want, all_parked, _ = _run(decode, vae, latent, device_budget=0, **kw)
    budget = all_parked.working_set_bytes // 2
    got, some, seen = _run(decode, vae, latent, device_budget=budget, **kw)
    assert np.array_equal(got, want)
    assert some.parked and 0 < some.parked_bytes < all_parked.parked_bytes
    assert seen.bytes["d2h"] == seen.bytes["h2d"] == some.parked_bytes
    _, fits, seen = _run(decode, vae, latent, device_budget=all_parked.working_set_bytes, **kw)
    assert not fits.parked and seen.bytes["d2h"] == 0  # the whole working set fits: nothing moves


@pytest.mark.parametrize("fn", ["decode", "encode"])
def test_estimated_mode_parks_nothing_even_with_no_device_budget(vae, latent, image, fn):
    arg = latent if fn == "decode" else image
    _, report, seen = _run({"decode": decode, "encode": encode}[fn], vae, arg, tile_px=TILE_PX,
                           mode="estimated", stats_px=16, device_budget=0)
    assert report.mode == "estimated" and report.tiles == 12
    assert seen.copies == 0 and not report.parked and report.parked_bytes == 0


def test_lot_keeps_paused_tiles_within_budget_and_returns_them_exactly():
    """Pause and resume five tiles over three rounds: what stays on the device (the very tensors
    handed in) never exceeds the budget; what parked comes back equal, as fresh tensors."""
    torch.manual_seed(0)
    sizes = [3, 5, 2, 4, 1]  # channels per tile; tensors (1, c, 4, 4) fp32 (64 c bytes each)
    budget = 64 * 7
    lot = Lot(torch.device("cpu"), budget, lambda i: 2 * 64 * sizes[i])
    held_peak, moved = 0, 0
    for rnd in range(3):
        tiles = {i: {"x": torch.randn(1, c, 4, 4), "h": torch.randn(1, c, 4, 4)[:, :, :, :]}
                 for i, c in enumerate(sizes)}
        originals = {i: dict(t) for i, t in tiles.items()}
        copies = {i: {k: v.clone() for k, v in t.items()} for i, t in tiles.items()}
        for i, t in tiles.items():
            lot.pause(i, t)
            resident = sum(sum(v.numel() * 4 for v in tiles[j].values())
                           for j in range(i + 1) if tiles[j]["x"] is originals[j]["x"])
            held_peak = max(held_peak, resident)
            moved += 0 if t["x"] is originals[i]["x"] else 2 * 64 * sizes[i]
        for i, t in tiles.items():
            lot.resume(i, t)
            for k in t:
                assert torch.equal(t[k], copies[i][k])
    lot.close()
    assert 0 < held_peak <= budget and lot.moved == moved > 0


def test_pinned_host_buffers_stay_within_the_pin_limit_as_torch_rounds_them():
    """torch's pinned allocator takes a power of two per block: buffers are pinned only while
    those rounded sizes fit the limit (the host budget); the rest are pageable."""
    from linfusion_cli.vae.parking import pinned_size

    assert [pinned_size(n) for n in (1, 4096, 4097, 3 << 30)] == [1, 4096, 8192, 4 << 30]
    lot = Lot(torch.device("cpu"), 0, lambda i: 1000, pin_limit=5000)
    for i in range(4):
        t = {"x": torch.randn(1, 2, 5, 5)}
        lot.pause(i, t)
        lot.resume(i, t)
    lot.close()
    assert lot.pinned == 4096 and lot.moved == 4 * 200  # two 2 KiB blocks fit 5000 B; 1128 B each asked


# ---------------------------------------------------------------- statistics on the device
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_device_moments_equal_a_float64_reference(dtype):
    torch.manual_seed(0)
    x = (torch.randn(1, 32, 19, 23) * 3 + torch.linspace(-2, 5, 23)).to(dtype)
    gn = torch.nn.GroupNorm(8, 32, eps=1e-6)
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    stats = torch_group_stats(x, 8)
    assert stats.mean.dtype == stats.var.dtype == torch.float64 and stats.mean.device == x.device
    groups = x.double().view(8, -1)  # the same values, reduced in float64
    torch.testing.assert_close(stats.mean, groups.mean(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(stats.var, groups.var(1, correction=0), rtol=1e-6, atol=0)
    ref = gn.double()(x.double())  # torch's GroupNorm in float64
    got = group_norm(x, gn.to(dtype), stats)
    assert got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert (got.double() - ref).abs().max().item() <= tol * ref.abs().max().item()
    assert (got.double() - ref).abs().max() <= 1.5 * (gn(x).double() - ref).abs().max() + 1e-6


def test_statistics_never_read_the_device():
    """On the meta device any .cpu() or .item() would raise: moments, pooling (one process and
    over ranks) and the normalisation all stay there."""
    x = torch.empty(1, 16, 24, 40, device="meta")
    parts = [channel_moments(x, (rows, slice(None))) for rows in (slice(0, 12), slice(12, 24))]
    stats = pool(parts, 4)
    gn = torch.nn.GroupNorm(4, 16).to("meta")
    seen = []

    class Group:  # a band group's all_reduce: the buffer must stay on the moments' device
        def all_reduce(self, flat, kind):
            seen.append((flat.device.type, flat.dtype, tuple(flat.shape), kind))
            return flat

    shared = shared_pool(Group())(parts, 4)
    assert stats.mean.is_meta and shared.var.is_meta and group_norm(x, gn, stats).is_meta
    assert seen == [("meta", torch.float64, (2 * 16 + 1,), "vae")]


def test_shared_pool_of_one_rank_is_pool():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 24, 40) * 2 + 1

    class One:
        def all_reduce(self, flat, kind):
            return flat

    parts = [channel_moments(x, t.core_slices()) for t in tile_grid(24, 40, 9, 0)]
    want, got = pool(parts, 4), shared_pool(One())(parts, 4)
    torch.testing.assert_close(got.mean, want.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.var, want.var, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- mid attention's SDPA calls
def test_query_chunk_is_one_fused_call_on_cuda_and_bounded_on_the_cpu():
    n = 1 << 20  # 1024^2 latent tokens, CUDA's exact limit
    assert attn_mod.query_chunk("cuda", n, n, 1, fused=True) == n  # one call, no N x N scores
    unfused = attn_mod.query_chunk("cuda", n, n, 1, fused=False, score_bytes=2 << 30)
    assert unfused * n * 4 <= 2 << 30 and unfused >= 1
    cpu = attn_mod.query_chunk("cpu", 128 * 128, 128 * 128, 1, fused=True, score_bytes=256 << 20)
    assert cpu == 4096 and cpu * 128 * 128 * 4 <= 256 << 20  # fused or not, the CPU is bounded
    assert attn_mod.query_chunk("cpu", 100, 100, 1, fused=False) == 100  # small: one call
    q = torch.randn(1, 1, 8, 16)
    assert not attn_mod.fused_sdpa(q, q, q)  # only CUDA tensors can say yes
