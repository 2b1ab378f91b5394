"""Tiled VAE: geometry, shared-GroupNorm maths, and tiled == untiled on odd sizes (tiny VAE, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from linfusion_cli.vae import choose_tile_px, decode, encode, split_axis, tile_grid, to_uint8
from linfusion_cli.vae import attention as attn_mod
from linfusion_cli.vae.norm import channel_moments, group_norm, pool, torch_group_stats
from benchmarks.synthetic import structured_image, structured_latent
from linfusion_cli.vae.tiles import Span, Tile, downscaled_size
from ..model_helpers import tiny_vae

H, W = 73, 97  # odd latent size -> 584 x 776 image


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


# ---------------------------------------------------------------- geometry
@pytest.mark.parametrize("length,tile,ctx", [(97, 32, 11), (73, 32, 11), (5, 32, 11), (64, 16, 0),
                                             (100, 7, 3)])
def test_split_axis_partitions_and_pads(length, tile, ctx):
    spans = split_axis(length, tile, ctx)
    assert spans[0].core0 == 0 and spans[-1].core1 == length
    for a, b in zip(spans, spans[1:]):
        assert a.core1 == b.core0  # cores partition: every pixel counted once
    for s in spans:
        assert 0 < s.core1 - s.core0 <= tile
        assert s.win0 == max(0, s.core0 - ctx) and s.win1 == min(length, s.core1 + ctx)
        c0, c1 = s.core_in_window
        assert c1 - c0 == s.core1 - s.core0 and 0 <= c0 and c1 <= s.win_len
    sizes = [s.core1 - s.core0 for s in spans]
    assert max(sizes) - min(sizes) <= 1  # near-equal cores


def test_tile_grid_covers_once_and_slices_agree():
    tiles = tile_grid(H, W, 32, 11)
    assert len(tiles) == 3 * 4
    cover = np.zeros((H * 8, W * 8), np.int32)
    for t in tiles:
        ys, xs = t.core_slices(8)
        cover[ys, xs] += 1
        # image windows are on the 8 px grid (encoder stride-2 grids line up)
        wy, wx = t.window_slices(8)
        assert wy.start % 8 == 0 and wx.start % 8 == 0
        cy, cx = t.crop_slices(8)
        assert cy.stop - cy.start == ys.stop - ys.start and cx.stop - cx.start == xs.stop - xs.start
        assert wy.start + cy.start == ys.start and wx.start + cx.start == xs.start
    assert (cover == 1).all()
    assert sum(t.core_area for t in tiles) == H * W
    one = Tile(Span(0, H, 0, H), Span(0, W, 0, W))  # the whole map as one tile
    assert one.core_area == one.window_area == H * W


def test_choose_tile_px_and_downscale():
    assert choose_tile_px(512, 768) == 0
    assert choose_tile_px(1024, 1024) == 0
    assert choose_tile_px(2048, 1024) == 1024
    assert choose_tile_px(16384, 16384, tile_px=512) == 512
    assert downscaled_size(2048, 1024, 128) == (128, 64)
    assert downscaled_size(73, 97, 128) == (73, 97)
    assert max(downscaled_size(73, 97, 32)) == 32


# ---------------------------------------------------------------- GroupNorm maths
def test_pooled_core_moments_equal_whole_image_groupnorm():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 37, 53) * 3 + torch.linspace(-2, 5, 53)  # drifting tone
    gn = torch.nn.GroupNorm(4, 16, eps=1e-6)
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    parts = [channel_moments(x, t.core_slices()) for t in tile_grid(37, 53, 16, 0)]
    stats = pool(parts, 4)
    whole = torch_group_stats(x, 4)
    assert torch.allclose(stats.mean, whole.mean, atol=1e-6)  # float32 per-channel Welford
    assert torch.allclose(stats.var, whole.var, rtol=1e-6)
    assert torch.allclose(group_norm(x, gn, stats), gn(x), atol=2e-6)


# ---------------------------------------------------------------- tiny VAE fixtures
@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture(scope="module")
def latent():
    return structured_latent(H, W, seed=1)  # (1, 4, 73, 97), UNet scale (std 1)


@pytest.fixture(scope="module")
def ref_image(vae, latent):
    with torch.no_grad():
        return to_uint8(vae.decode(latent / vae.config.scaling_factor).sample)  # (584, 776, 3)


@pytest.fixture(scope="module")
def image():
    return structured_image(H * 8, W * 8, seed=2)


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


# ---------------------------------------------------------------- decode
def test_untiled_decode_equals_diffusers(vae, latent, ref_image):
    out = decode(vae, latent, tile_px=0)
    assert out.dtype == np.uint8 and out.shape == (H * 8, W * 8, 3)
    assert np.array_equal(out, ref_image)
    assert ref_image.std() > 20  # a real range of tones, not flat grey


def test_small_image_defaults_to_untiled(vae, latent, ref_image):
    reports = []
    assert np.array_equal(decode(vae, latent, on_report=reports.append), ref_image)
    assert [r.mode for r in reports] == ["untiled"]


def test_exact_tiled_decode_matches_untiled(vae, latent, ref_image):
    calls, handle = _count_calls(vae.decoder.conv_out)
    progress, reports = [], []
    try:
        out = decode(vae, latent, tile_px=256, mode="exact", on_report=reports.append,
                     on_tile=lambda d, n: progress.append((d, n)))
    finally:
        handle.remove()
    n = len(tile_grid(H, W, 32, 11))
    (report,) = reports
    assert len(calls) == n == report.tiles == 12  # conv_out ran once per tile
    assert progress == [(i + 1, n) for i in range(n)]
    diff = np.abs(out.astype(int) - ref_image.astype(int))
    assert diff.max() <= 1 and diff.mean() < 1e-3
    assert report.mode == "exact" and report.attention == "exact" and report.gn_rounds > 0


def test_estimated_tiled_decode_is_close(vae, latent, ref_image):
    calls, handle = _count_calls(vae.decoder.conv_out)
    reports = []
    try:
        out = decode(vae, latent, tile_px=256, mode="estimated", stats_px=32, on_report=reports.append)
    finally:
        handle.remove()
    assert len(calls) == 12 + 1  # 12 tiles + the downscaled stats pass
    assert [r.mode for r in reports] == ["estimated"]
    assert psnr(out, ref_image) > 20


def test_auto_mode_falls_back_to_estimated_when_over_budget(vae, latent):
    reports = []
    decode(vae, latent[:, :, :16, :24], tile_px=64, stats_px=8, host_budget=1, on_report=reports.append)
    decode(vae, latent[:, :, :16, :24], tile_px=64, on_report=reports.append)
    over, fits = reports
    assert over.mode == "estimated" and over.working_set_bytes > over.budget_bytes == 1
    assert fits.mode == "exact" and fits.working_set_bytes <= fits.budget_bytes


def test_auto_mode_budget_is_hostmems_share_of_free_ram(vae, latent, monkeypatch):
    from linfusion_cli import hostmem

    small = latent[:, :, :16, :24]
    reports = []
    decode(vae, small, tile_px=64, mode="exact", on_report=reports.append)
    need = reports[0].working_set_bytes
    for free in (2 * need, 2 * need - 2):  # half of it just fits, then just does not
        monkeypatch.setattr(hostmem, "host_memory", lambda: hostmem.HostMemory(64 * need, free))
        decode(vae, small, tile_px=64, stats_px=8, on_report=reports.append)
    assert [(r.mode, r.budget_bytes) for r in reports[1:]] == [("exact", need), ("estimated", need - 1)]


def test_decode_rejects_batches(vae, latent):
    with pytest.raises(ValueError):
        decode(vae, torch.cat([latent, latent]))


# ---------------------------------------------------------------- encode
def test_untiled_encode_matches_diffusers_img2img(vae, image):
    from diffusers.image_processor import VaeImageProcessor

    x = VaeImageProcessor(vae_scale_factor=8).preprocess(Image.fromarray(image))
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        want = dist.sample(torch.Generator().manual_seed(3)) * vae.config.scaling_factor
        mean = dist.mode() * vae.config.scaling_factor
    got = encode(vae, Image.fromarray(image), tile_px=0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)
    assert torch.equal(encode(vae, image, tile_px=0), mean)


def test_exact_tiled_encode_matches_untiled(vae, image):
    want = encode(vae, image, tile_px=0, generator=torch.Generator().manual_seed(3))
    reports = []
    got = encode(vae, image, tile_px=256, mode="exact", on_report=reports.append,
                 generator=torch.Generator().manual_seed(3))
    assert got.shape == (1, 4, H, W) and [r.tiles for r in reports] == [12]
    assert (got - want).abs().max().item() <= 1e-4


def test_estimated_tiled_encode_is_close(vae, image):
    want = encode(vae, image, tile_px=0)
    got = encode(vae, image, tile_px=256, mode="estimated", stats_px=32)
    err = got - want
    assert err.abs().max().item() < 0.1 * (want - want.mean()).abs().max().item()
    assert (err.pow(2).mean().sqrt() / want.std()).item() < 0.1  # about 5% relative RMS error


def test_encode_rejects_sizes_off_the_grid(vae):
    with pytest.raises(ValueError):
        encode(vae, np.zeros((100, 64, 3), np.uint8))


# ---------------------------------------------------------------- mid-block attention
def test_chunked_attention_equals_diffusers_and_windows_are_reported(vae, latent):
    attn = vae.decoder.mid_block.attentions[0]
    torch.manual_seed(1)
    x = torch.randn(1, attn.to_q.in_features, 24, 40)
    with torch.no_grad():
        want = attn(x)
        got, exact = attn_mod.mid_attention(attn, x, token_limit=10_000)
        assert exact and torch.allclose(got, want, atol=1e-5)
        q, k, v = torch.randn(3, 1, 2, 960, 16).unbind(0)
        chunked = attn_mod._sdpa_chunked(q, k, v, score_bytes=4 * 2 * 960 * 100)  # 100 queries a call
        whole = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        assert torch.allclose(chunked, whole, atol=1e-6)
        win, exact = attn_mod.mid_attention(attn, x, token_limit=100, window=16, overlap=4)
    assert not exact and win.shape == want.shape
    reports = []
    decode(vae, latent[:, :, :16, :24], tile_px=64, mode="exact", attn_token_limit=100,
           on_report=reports.append)
    assert [r.attention for r in reports] == ["windowed"]


def test_windowed_mid_attention_is_exact_when_one_window_covers_the_map():
    """Windows project q/k/v per window; a window covering everything equals global attention."""
    from diffusers import AutoencoderKL

    from linfusion_cli.models.tiny import VAE_CONFIG
    from linfusion_cli.vae.attention import mid_attention

    torch.manual_seed(0)
    attn = AutoencoderKL(**VAE_CONFIG).decoder.mid_block.attentions[0].eval()
    x = torch.randn(1, attn.to_q.in_features, 12, 20)
    with torch.no_grad():
        reference = attn(x)
        exact, was_exact = mid_attention(attn, x, token_limit=10 ** 6)
        one_window, windowed = mid_attention(attn, x, token_limit=0, window=64, overlap=8)
        small, _ = mid_attention(attn, x, token_limit=0, window=8, overlap=4)
    assert was_exact and not windowed
    torch.testing.assert_close(exact, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_window, reference, rtol=1e-5, atol=1e-5)
    assert small.shape == x.shape and not torch.allclose(small, reference, atol=1e-4)


def test_an_fp16_vae_with_force_upcast_decodes_and_encodes_in_float32():
    """SD-XL's VAE config sets force_upcast: its fp16 weights run in float32 (and stay fp16)."""
    from diffusers import AutoencoderKL

    from linfusion_cli.models.tiny import VAE_CONFIG
    from linfusion_cli.vae import decode, encode

    torch.manual_seed(0)
    half = AutoencoderKL(**{**VAE_CONFIG, "force_upcast": True}).eval().half()
    full = AutoencoderKL(**{**VAE_CONFIG, "force_upcast": True}).eval()
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    latent = torch.randn(1, 4, 24, 24) * 40  # large values: fp16 activations would overflow
    assert np.array_equal(decode(half, latent, tile_px=0), decode(full, latent, tile_px=0))
    assert next(half.parameters()).dtype == torch.float16
    image = (torch.rand(96, 96, 3) * 255).to(torch.uint8).numpy()
    assert torch.equal(encode(half, image, tile_px=0), encode(full, image, tile_px=0))
