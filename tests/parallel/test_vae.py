"""The tiled VAE over ranks: each rank runs a band of the latent-resolution layers and whole tile
rows over it; the image (and latent) equals one process's, and each rank's share of the memory
is estimated against a meta-device trace of that rank."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from linfusion_cli.vae.tiles import band_of, rank_bands, rank_tiles, split_axis, tile_grid, window_halo

from .helpers import run_ranks

CONFIGS = Path(__file__).resolve().parents[2] / "linfusion_cli" / "models" / "configs"
GIB = 2 ** 30
# (latent h, w, tile px, statistics mode, attention token limit, band rows): exact and windowed
# attention (8 px windows), both statistics modes, bands or one band per rank, a latent with
# fewer rows than 3 ranks (then not shared: every rank runs it all)
CASES = [(19, 23, 64, "exact", 10 ** 9, 0), (19, 23, 64, "exact", 100, 5),
         (21, 16, 48, "estimated", 100, 0), (17, 12, 64, "exact", 10 ** 9, 3),
         (2, 23, 64, "exact", 10 ** 9, 0)]


# ---------------------------------------------------------------- geometry (pure)

@pytest.mark.parametrize("h,w,tile,ranks", [(19, 23, 8, 2), (19, 23, 8, 3), (256, 64, 32, 8),
                                            (2048, 2048, 256, 8), (2048, 1024, 256, 3),
                                            (9, 30, 64, 4), (5, 5, 1, 3), (3, 7, 8, 4)])
def test_rank_tiles_are_whole_rows_that_partition_the_map(h, w, tile, ranks):
    shares = rank_tiles(h, w, tile, 11, ranks)
    if h < ranks:
        assert shares == [tile_grid(h, w, tile, 11)]
        return
    assert len(shares) == ranks and all(shares)
    parts = [band_of(ts) for ts in shares]
    assert parts == rank_bands(h, w, tile, 11, ranks)
    assert parts[0][0] == 0 and parts[-1][1] == h
    assert all(a1 == b0 for (_, a1), (b0, _) in zip(parts, parts[1:]))  # contiguous, in rank order
    covered = np.zeros((h, w), dtype=int)
    for (a, b), ts in zip(parts, shares):
        for t in ts:
            assert a <= t.y.core0 < t.y.core1 <= b and t.y.core1 - t.y.core0 <= tile
            covered[t.core_slices()] += 1
    assert (covered == 1).all()  # every latent pixel in exactly one rank's tile core
    rows = [len({t.y for t in ts}) for ts in shares]
    wanted = -(-len(split_axis(h, tile, 11)) // ranks) * ranks  # rows: a multiple of ranks
    assert max(rows) - min(rows) == (0 if wanted <= h else 1)  # balanced (unless rows run out)
    if len(tile_grid(h, w, tile, 11)) // len({t.x for t in tile_grid(h, w, tile, 11)}) % ranks == 0:
        assert sum(shares, []) == tile_grid(h, w, tile, 11)  # one process's grid, unchanged


def test_window_halo_is_what_the_windows_meeting_each_band_read():
    windows = tile_grid(100, 40, 24, 4)
    parts = [(0, 30), (30, 61), (61, 100)]
    top, bottom = window_halo(windows, parts)
    for a, b in parts:
        for t in windows:
            if t.y.core0 < b and t.y.core1 > a:
                assert a - top <= t.y.win0 and t.y.win1 <= b + bottom
    assert (top, bottom) != (0, 0)


# ---------------------------------------------------------------- over processes == one process

def _run(group, folder: str, tag: str) -> None:
    """Every case's decode, encode and reports with `group` (None: one process), saved."""
    from diffusers import AutoencoderKL

    from benchmarks.synthetic import structured_image, structured_latent
    from linfusion_cli.models.tiny import VAE_CONFIG
    from linfusion_cli.vae import attention as attn_mod
    from linfusion_cli.vae import blocks as blocks_mod
    from linfusion_cli.vae import decode, encode

    # 8 px attention windows: several window rows per band, halos from more than one rank
    blocks_mod.mid_attention = functools.partial(attn_mod.mid_attention, window=8, overlap=2)
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    out = {}
    for i, (h, w, tile, mode, limit, rows) in enumerate(CASES):
        reports = []
        kw = dict(tile_px=tile, mode=mode, attn_token_limit=limit, band_rows=rows, group=group,
                  on_report=reports.append)
        out[i] = {"image": decode(vae, structured_latent(h, w, seed=1), **kw),
                  "latent": encode(vae, structured_image(h * 8, w * 8, seed=2), **kw),
                  "reports": [r.to_dict() for r in reports],
                  "sent": dict(group.sent) if group is not None else {}}
    torch.save(out, f"{folder}/{tag}.pt")


def _worker(rank: int, size: int, folder: str) -> None:
    from linfusion_cli.parallel import BandGroup

    _run(BandGroup(rank, size), folder, f"rank{rank}")
    if rank == 0:
        _run(None, folder, "single")


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.slow
def test_vae_over_ranks_equals_one_process(tmp_path, size):
    run_ranks(size, _worker, str(tmp_path))
    single = torch.load(tmp_path / "single.pt", weights_only=False)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(size)]
    for i, (h, *_rest) in enumerate(CASES):
        want = single[i]
        for got in ranks:
            diff = np.abs(got[i]["image"].astype(int) - want["image"].astype(int)).max()
            assert diff <= 1, (i, diff)
            rel = ((got[i]["latent"] - want["latent"]).abs().max() / want["latent"].abs().max()).item()
            assert rel <= 1e-5, (i, rel)
            assert np.array_equal(got[i]["image"], ranks[0][i]["image"])  # every rank the same
            assert torch.equal(got[i]["latent"], ranks[0][i]["latent"])
            shared = h >= size
            assert [r.get("ranks") for r in got[i]["reports"]] == [size if shared else None] * 2
        if h >= size:  # the reports count every rank's tiles
            tile, w = CASES[i][2] // 8, CASES[i][1]
            assert {r[i]["reports"][0]["tiles"] for r in ranks} == \
                {sum(len(ts) for ts in rank_tiles(h, w, tile, 11, size))}
    assert all(r[1]["sent"].get("halo", 0) > 0 and r[1]["sent"].get("vae", 0) > 0 for r in ranks)


# ---------------------------------------------------------------- one rank's memory

@functools.cache
def _meta_vae():
    from linfusion_cli.tracing.unet import meta_vae

    return meta_vae(json.loads((CONFIGS / "sd15_vae.json").read_text()))


@pytest.mark.parametrize("width,height,rows,encode_,size,tile", [
    (16384, 16384, 64, False, 8, 2048),  # windowed attention: the windows' halo rows
    (16384, 16384, 16, True, 8, 1024),
    (16384, 8192, 0, False, 3, 2048),  # one band per rank
    (8192, 8192, 0, False, 4, 2048),  # exact attention: gathered keys and values
    (8192, 8192, 32, True, 4, 2048),
])
def test_rank_estimate_against_a_trace_of_one_rank(width, height, rows, encode_, size, tile):
    """The planner's per-rank figure for the latent-resolution part against a meta-device trace
    of rank 1's share (the counting group: received halos, sent copies and gathers are real
    tensors there): under by at most 2%, over by at most 12%; and far below one process's."""
    from linfusion_cli.parallel.traffic import CountingGroup
    from linfusion_cli.planning.memory.walk import whole_latent_elements_banded
    from linfusion_cli.tracing.unet import trace_vae_whole_bytes

    cfg = json.loads((CONFIGS / "sd15_vae.json").read_text())
    limit = 1024 * 1024  # CUDA's
    traced = trace_vae_whole_bytes(cfg, width=width, height=height, band_rows=rows,
                                   token_limit=limit, encode=encode_, vae=_meta_vae(),
                                   group=CountingGroup(1, size, "meta"), tile_px=tile)
    parts = rank_bands(height // 8, width // 8, tile // 8, 11, size)
    estimated = 2 * whole_latent_elements_banded(cfg, latent_h=height // 8, latent_w=width // 8,
                                                 band_rows=rows, dtype_bytes=2, token_limit=limit,
                                                 parts=parts)
    assert 0.98 <= estimated / traced <= 1.12, (estimated / GIB, traced / GIB)
    alone = 2 * whole_latent_elements_banded(cfg, latent_h=height // 8, latent_w=width // 8,
                                             band_rows=rows or 64, dtype_bytes=2, token_limit=limit)
    assert traced < alone * 0.9


def test_16k_over_8_ranks_fits_small_gpus():
    """SD1.5 16384x16384: alone its tightest plan needs 10.8 GiB (the VAE's latent part); over 8
    ranks each GPU needs 4 GiB, the VAE's share of it cut by 8 like the UNet's."""
    from linfusion_cli.planning.memory.planner import BudgetError, choose_knobs, load_family_configs

    unet, vae = load_family_configs("sd15")
    kw = dict(width=16384, height=16384, dtype_bytes=2, device="cuda", vae_bytes=2)
    with pytest.raises(BudgetError) as alone:
        choose_knobs(unet, vae, budget_bytes=8 * GIB, **kw)
    assert alone.value.needed_bytes > 10 * GIB
    plan = choose_knobs(unet, vae, budget_bytes=int(4.5 * GIB), world_size=8, **kw)
    assert plan.vae_tile_px and plan.estimated_peak_gib <= 4.5
