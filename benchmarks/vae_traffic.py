"""Host<->device bytes of the tiled VAE's paused tiles, counted on the meta device (no GPU, no
weights): the SD1.5 VAE config, a 16384 x 16384 image in 2048 px tiles, 16-bit activations.

Runs the tiled path itself (vae/drive.run_tiles over blocks.decoder_tile / encoder_tile on meta
windows, parked through vae/parking.Lot and runtime.transfer), so the bytes are what the code
copies, not a hand count:
- before: every tile parked at every GroupNorm (what the CUDA path did in both modes),
  i.e. device_budget=0;
- estimated mode: tiles run one by one, nothing parks;
- exact mode under a device budget (default 24 GiB of paused tiles).
From the repo root:
    python -m benchmarks.vae_traffic [--size 16384] [--tile-px 2048] [--budget-gib 24]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks._measure import shipped_config
from linfusion_cli.runtime import transfer
from linfusion_cli.tracing.unet import meta_vae
from linfusion_cli.figures import DECODER_CONTEXT, ENCODER_CONTEXT
from linfusion_cli.vae.blocks import TileCtx, decoder_split, decoder_tile, encoder_tile
from linfusion_cli.vae.drive import run_recording, run_tiles
from linfusion_cli.vae.parking import Lot
from linfusion_cli.vae.tiles import tile_grid
from linfusion_cli.vae.working_set import exact_working_set, peak_elements_per_px

GIB = 2 ** 30


def _windows(vae, decoder: bool, lh: int, lw: int, tile_px: int):
    """(tiles, start(tile, ctx), stats-pass generator): the tiled path on meta windows."""
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    dtype = next(vae.parameters()).dtype
    tiles = tile_grid(lh, lw, tile_px // f, DECODER_CONTEXT if decoder else ENCODER_CONTEXT)
    if decoder:  # the latent-resolution map's channels (decoder_whole's output)
        c = vae.decoder.up_blocks[decoder_split(vae.decoder)].resnets[-1].out_channels
        window = lambda h, w: torch.empty(1, c, h, w, dtype=dtype, device="meta")  # noqa: E731
        path = decoder_tile
    else:
        window = lambda h, w: torch.empty(1, 3, h * f, w * f, dtype=dtype, device="meta")  # noqa: E731
        path = encoder_tile
    start = lambda t, ctx: path(vae, window(t.y.win_len, t.x.win_len), ctx)  # noqa: E731
    stats_pass = path(vae, window(16, 16), TileCtx((0, 16, 0, 16), (16, 16)))
    return tiles, start, stats_pass


def traffic(vae, *, decoder: bool, size: int, tile_px: int, mode: str, budget: int | None) -> dict:
    """Bytes each way (counted by runtime.transfer) of one tiled pass on the meta device."""
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    lh = lw = size // f
    itemsize = torch.finfo(next(vae.parameters()).dtype).bits // 8
    tiles, start, stats_pass = _windows(vae, decoder, lh, lw, tile_px)
    need = exact_working_set(dict(vae.config), width=size, height=size, tile_px=tile_px,
                             decoder=decoder, itemsize=itemsize)
    stats = run_recording(stats_pass)[1] if mode == "estimated" else None
    lot = None
    if mode == "exact" and budget is not None and need > budget:  # tiled._lot's decision
        per_px = peak_elements_per_px(dict(vae.config), decoder) * itemsize
        lot = Lot(torch.device("meta"), budget, lambda i: per_px * tiles[i].window_area)
    seen = {"d2h": 0, "h2d": 0}
    with transfer.observed(lambda d, n, blocking: seen.__setitem__(d, seen[d] + n)):
        rounds = run_tiles(tiles, start, lambda t, out: None, stats=stats, lot=lot)
    if lot is not None:
        lot.close()
        assert lot.moved == seen["d2h"] == seen["h2d"]
    return {"tiles": len(tiles), "rounds": rounds, "working_set": need, **seen}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--tile-px", type=int, default=2048)
    ap.add_argument("--budget-gib", type=float, default=24.0)
    args = ap.parse_args()
    vae = meta_vae(shipped_config("sd15", "vae"), torch.float16)
    budget = int(args.budget_gib * GIB)
    print(f"SD1.5 VAE, {args.size}x{args.size} px, {args.tile_px} px tiles, fp16, meta device; "
          "bytes each way between device and host")
    for decoder in (True, False):
        cases = [("before: every tile parked at every GroupNorm", "exact", 0),
                 ("estimated", "estimated", 0),
                 (f"exact, device budget {args.budget_gib:g} GiB", "exact", budget)]
        for name, mode, b in cases:
            r = traffic(vae, decoder=decoder, size=args.size, tile_px=args.tile_px, mode=mode, budget=b)
            print(f"  {'decode' if decoder else 'encode'}  {name:<46} {r['d2h'] / GIB:>9.1f} GiB out "
                  f"{r['h2d'] / GIB:>9.1f} GiB in  ({r['tiles']} tiles, {r['rounds'] or 0} GN rounds, "
                  f"working set {r['working_set'] / GIB:.1f} GiB)", flush=True)


if __name__ == "__main__":
    main()
