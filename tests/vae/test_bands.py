"""The tiled VAE's whole-latent part band by band (band_rows): equal to the whole-map path (tiny
VAE, fp32, CPU), threaded from the plan, and its estimate checked against a meta-device trace."""

from __future__ import annotations

import functools
import json
from pathlib import Path
import numpy as np
import pytest
import torch

from benchmarks.synthetic import structured_image, structured_latent
from linfusion_cli.vae import attention as attn_mod
from linfusion_cli.vae import blocks as blocks_mod
from linfusion_cli.vae import decode, encode
from linfusion_cli.vae.blocks import decoder_whole, encoder_whole

H, W = 37, 45  # odd latent size: no band size below divides it except 1
BANDS = [1, 4, 7, 16, 64]  # 64 > H: one band
CONFIGS = Path(__file__).resolve().parents[2] / "linfusion_cli" / "models" / "configs"
GIB = 2 ** 30


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKL

    from linfusion_cli.models.tiny import VAE_CONFIG

    torch.manual_seed(0)
    return AutoencoderKL(**VAE_CONFIG).eval()


@pytest.fixture
def small_windows(monkeypatch):
    """Mid attention windows of 16 px (4 overlap): several window rows and columns on H x W."""
    monkeypatch.setattr(blocks_mod, "mid_attention",
                        functools.partial(attn_mod.mid_attention, window=16, overlap=4))


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """Max abs difference within `rel` of the reference's largest magnitude."""
    assert got.shape == want.shape
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err <= rel, f"relative error {err:.2e}"


# ---------------------------------------------------------------- banded == whole maps
@pytest.mark.parametrize("token_limit", [10 ** 9, 100], ids=["exact", "windowed"])
def test_decoder_whole_banded_equals_whole_maps(vae, small_windows, token_limit):
    torch.manual_seed(1)
    z = torch.randn(1, 4, H, W)
    with torch.inference_mode():
        want, exact = decoder_whole(vae, z, token_limit)
        for rows in BANDS:
            got, got_exact = decoder_whole(vae, z, token_limit, band_rows=rows)
            assert got_exact == exact == (token_limit > H * W)
            assert_rel_close(got, want)


@pytest.mark.parametrize("token_limit", [10 ** 9, 100], ids=["exact", "windowed"])
def test_encoder_whole_banded_equals_whole_maps(vae, small_windows, token_limit):
    torch.manual_seed(2)
    feat = torch.randn(1, vae.encoder.down_blocks[-1].resnets[0].in_channels, H, W)
    with torch.inference_mode():
        want, exact = encoder_whole(vae, feat.clone(), token_limit)
        for rows in BANDS:
            got, got_exact = encoder_whole(vae, feat.clone(), token_limit, band_rows=rows)
            assert got_exact == exact == (token_limit > H * W)
            assert_rel_close(got, want)


@pytest.mark.parametrize("rows", [3, 10, 100])
def test_windowed_attention_banded_equals_windowed(vae, rows):
    """Windows normalised on demand from band moments == windows of the normalised map."""
    attn = vae.decoder.mid_block.attentions[0]
    torch.manual_seed(3)
    x = torch.randn(1, attn.to_q.in_features, 41, 53) * 2 + 1
    with torch.inference_mode():
        want, exact = attn_mod.mid_attention(attn, x, token_limit=0, window=16, overlap=4)
        got, got_exact = attn_mod.mid_attention(attn, x, token_limit=0, window=16, overlap=4,
                                                band_rows=rows)
    assert not exact and not got_exact
    assert_rel_close(got, want)


# ---------------------------------------------------------------- decode / encode / stages
def test_tiled_decode_and_encode_take_band_rows(vae):
    latent = structured_latent(19, 23, seed=1)
    image = structured_image(19 * 8, 23 * 8, seed=2)
    reports = []
    kw = {"tile_px": 96, "mode": "exact", "attn_token_limit": 200, "on_report": reports.append}
    want = decode(vae, latent, **kw)
    got = decode(vae, latent, band_rows=5, **kw)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    lat_want = encode(vae, image, **kw)
    lat_got = encode(vae, image, band_rows=6, **kw)
    assert_rel_close(lat_got, lat_want)
    assert [r.band_rows for r in reports] == [None, 5, None, 6]
    assert [r.attention for r in reports] == ["windowed"] * 4
    assert "band_rows" not in reports[0].to_dict() and reports[1].to_dict()["band_rows"] == 5


def test_stages_pass_the_plans_band_rows(monkeypatch):
    from dataclasses import replace

    from linfusion_cli.pipeline import context as stages
    from linfusion_cli.planning.memory import MemoryPlan, candidate_plans
    from linfusion_cli.planning.plan import build_plan

    from ..model_helpers import bare_context, bare_model

    plan = build_plan(prompt="p", width=128, height=128, native=64, strengths=[0.5], steps=2,
                      guidance=5.0, seed=1, scheduler="ddim", model="m", family="sd15", linfusion=None)
    base = plan.stages[0]
    assert stages.band_rows(replace(base, memory=MemoryPlan(band_rows=32))) == 32
    assert stages.band_rows(replace(base, memory=MemoryPlan())) == 0
    assert stages.band_rows(replace(base, memory=None)) == 0
    plans = candidate_plans(4096, 4096, fixed={"band_rows": 64})
    assert plans and {p.band_rows for p in plans} == {64}
    seen = {}
    monkeypatch.setattr(stages, "vae_on_device", lambda v: None)
    monkeypatch.setattr(stages.tiled_vae, "decode", lambda *a, **kw: seen.update(kw))
    ctx = bare_context(monkeypatch, plan, bare_model())
    stage = replace(base, memory=MemoryPlan(vae_tile_px=512, band_rows=16))
    stages.decode(ctx, stage, torch.zeros(1, 4, 8, 8))
    assert seen["band_rows"] == 16 and seen["tile_px"] == 512


# ---------------------------------------------------------------- estimate vs trace
def _sd_vae() -> dict:
    return json.loads((CONFIGS / "sd15_vae.json").read_text())


@pytest.mark.parametrize("width,height,rows,encode_", [
    (16384, 16384, 64, False), (16384, 16384, 256, False),
    (16384, 8192, 16, True), (16384, 8192, 64, False), (16384, 8192, 256, True),
])
@pytest.mark.slow  # a full-size meta trace or several runs: not the quick tier
def test_banded_estimate_matches_meta_trace_at_full_size(width, height, rows, encode_):
    from linfusion_cli.tracing.unet import trace_vae_whole_bytes
    from linfusion_cli.planning.memory.walk import whole_latent_elements_banded

    cfg = _sd_vae()
    limit = 1024 * 1024  # CUDA's: windowed attention at these sizes
    traced = trace_vae_whole_bytes(cfg, width=width, height=height, band_rows=rows,
                                   token_limit=limit, encode=encode_, vae=_meta(cfg))
    est = 2 * whole_latent_elements_banded(cfg, latent_h=height // 8, latent_w=width // 8,
                                           band_rows=rows, dtype_bytes=2, token_limit=limit)
    assert abs(est - traced) <= 0.05 * traced, (est / GIB, traced / GIB)
    whole = 6 * 512 * (height // 8) * (width // 8) * 2  # the unbanded part's estimate
    assert traced < 0.6 * whole


@functools.cache
def _meta_cached(key: str):
    from linfusion_cli.tracing.unet import meta_vae

    return meta_vae(json.loads(key))


def _meta(cfg: dict):
    return _meta_cached(json.dumps(cfg, sort_keys=True))


@pytest.mark.parametrize("token_limit", [0, 10 ** 9], ids=["windowed", "exact"])
def test_banded_estimate_attention_terms(token_limit):
    """Small bands: the attention window (or the exact global attention) sets the peak."""
    from linfusion_cli.tracing.unet import trace_vae_whole_bytes
    from linfusion_cli.planning.memory.walk import whole_latent_elements_banded

    cfg = _sd_vae()
    traced = trace_vae_whole_bytes(cfg, width=2048, height=1536, band_rows=4,
                                   token_limit=token_limit, vae=_meta(cfg))
    est = 2 * whole_latent_elements_banded(cfg, latent_h=192, latent_w=256, band_rows=4,
                                           dtype_bytes=2, token_limit=token_limit)
    assert abs(est - traced) <= 0.05 * traced, (est / GIB, traced / GIB)


def test_vae_estimate_with_and_without_bands():
    from linfusion_cli.planning.memory.walk import (
        vae_activation_bytes,
        whole_latent_channels,
    )

    cfg = _sd_vae()
    size = {"height": 16384, "width": 16384, "tile_px": 1024, "dtype_bytes": 2}
    unbanded = vae_activation_bytes(cfg, **size)
    assert unbanded == vae_activation_bytes(cfg, band_rows=0, **size)
    assert unbanded == whole_latent_channels(cfg) * 2048 * 2048 * 2  # the whole part, as before
    banded = vae_activation_bytes(cfg, band_rows=64, **size)
    assert 8 * GIB < banded < 9 * GIB  # two 4 GiB maps and a band
    assert vae_activation_bytes(cfg, band_rows=64, **dict(size, tile_px=0)) == \
        vae_activation_bytes(cfg, **dict(size, tile_px=0))  # untiled: bands do not apply
