"""Tiled VAE decode on the real SD VAE architecture: accuracy, seams, time and peak memory.

Compares, at each size, against the untiled decode: our "exact" mode, our "estimated" mode,
naive per-tile decoding (each context-padded window through the whole decoder, cropped), and
diffusers' built-in tiling (`enable_tiling()`, same tile size). Random weights (PyTorch default
init already gives decoded images with a realistic spread of tones, std ~0.4 in [-1, 1]); fp32,
CPU. Latents have regional structure (tone ramps, blobs), the case where per-tile GroupNorm
statistics drift. The VAE config is the shipped SD1.5 one. From the repo root:
    python -m benchmarks.vae_tiling [--sizes 384 512] [--tile-px 256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from diffusers import AutoencoderKL

from benchmarks._measure import PeakRSS, run_isolated, shipped_config
from benchmarks.synthetic import structured_latent
from linfusion_cli.vae import decode, split_axis, tile_grid, to_uint8


def sd_vae():
    """The SD VAE architecture (the package's shipped sd15 config), random weights, eval mode."""
    torch.manual_seed(0)
    return AutoencoderKL.from_config(shipped_config("sd15", "vae")).eval()


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def seam_score(img, rows, cols):
    """Mean |pixel step| across the given borders / mean |step| everywhere else (1 = no seam)."""
    x = img.astype(np.float64)
    dy = np.abs(np.diff(x, axis=0)).mean(axis=(1, 2))  # step between row i and i+1
    dx = np.abs(np.diff(x, axis=1)).mean(axis=(0, 2))
    by = np.zeros(len(dy), bool)
    bx = np.zeros(len(dx), bool)
    by[[r - 1 for r in rows]] = True
    bx[[c - 1 for c in cols]] = True
    border = np.concatenate([dy[by], dx[bx]])
    other = np.concatenate([dy[~by], dx[~bx]])
    return border.mean() / other.mean()


def naive_tiles(vae, z, tile_px, context=11):
    """Each padded window through the whole decoder with its own GroupNorm stats, cropped."""
    h, w = z.shape[-2:]
    out = np.empty((h * 8, w * 8, 3), np.uint8)
    zz = z / vae.config.scaling_factor
    for t in tile_grid(h, w, tile_px // 8, context):
        ys, xs = t.window_slices()
        img = vae.decoder(vae.post_quant_conv(zz[:, :, ys, xs].contiguous()))
        cy, cx = t.crop_slices(8)
        cys, cxs = t.core_slices(8)
        out[cys, cxs] = to_uint8(img[:, :, cy, cx])
    return out


def diffusers_tiles(vae, z, tile_px):
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile_px, tile_px // 8
    try:
        return to_uint8(vae.decode(z / vae.config.scaling_factor).sample)
    finally:
        vae.disable_tiling()


def flat_case(size: int, tile_px: int, mode: str, stats_px: int) -> dict:
    """One tiled decode in a fresh process (run_isolated adds its peak RSS)."""
    vae = sd_vae()
    z = structured_latent(size // 8, size // 8) * vae.config.scaling_factor
    with torch.inference_mode():
        start = time.perf_counter()
        decode(vae, z, tile_px=tile_px, mode=mode, stats_px=stats_px)
    return {"seconds": time.perf_counter() - start}


def flat_memory(sizes, tile_px: int, stats_px: int) -> None:
    """Peak RSS of estimated-mode decodes at growing sizes, each in its own process."""
    print(f"peak RSS of the estimated mode, tile {tile_px} px, stats pass {stats_px} latent px, "
          "fresh process per size:")
    for size in sizes:
        r = run_isolated("benchmarks.vae_tiling", "flat_case", size=size, tile_px=tile_px, mode="estimated",
                         stats_px=stats_px)
        print(f"  {size:>5} px: " + (f"{r['seconds']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB"
                                     if "error" not in r else r["error"]), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--flat", type=int, nargs="+", default=None,
                    help="only measure estimated-mode peak memory at these sizes")
    ap.add_argument("--sizes", type=int, nargs="+", default=[384, 512])
    ap.add_argument("--tile-px", type=int, default=256)
    ap.add_argument("--stats-px", type=int, default=32, help="estimated mode: stats pass long side")
    args = ap.parse_args()
    if args.flat:
        flat_memory(args.flat, args.tile_px, args.stats_px)
        return
    vae = sd_vae()
    tp = args.tile_px
    print(f"SD VAE architecture, random weights, fp32, CPU x{torch.get_num_threads()} threads; "
          f"tile {tp} px, context 11 latent px, estimated stats from a {args.stats_px} latent px pass")
    print(f"{'size':>5} {'method':<10} {'PSNR dB':>8} {'max err':>7} {'seam':>6} {'seam(untiled)':>13} "
          f"{'time s':>7} {'peak MB':>8}")
    for size in args.sizes:
        z = structured_latent(size // 8, size // 8, seed=size)
        ours = [s.core0 * 8 for s in split_axis(size // 8, tp // 8, 11)[1:]]
        limit = tp - int(tp * 0.25)  # diffusers crops each tile to this (tile minus blend)
        theirs = list(range(limit, size, limit))
        runs = [
            ("untiled", lambda: decode(vae, z, tile_px=0), ours),
            ("exact", lambda: decode(vae, z, tile_px=tp, mode="exact"), ours),
            ("estimated", lambda: decode(vae, z, tile_px=tp, mode="estimated",
                                         stats_px=args.stats_px), ours),
            ("naive", lambda: naive_tiles(vae, z, tp), ours),
            ("diffusers", lambda: diffusers_tiles(vae, z, tp), theirs),
        ]
        ref = None
        for name, fn, borders in runs:
            with torch.inference_mode(), PeakRSS() as mem:
                t0 = time.perf_counter()
                img = fn()
                dt = time.perf_counter() - t0
            ref = img if ref is None else ref
            err = np.abs(img.astype(int) - ref.astype(int)).max()
            print(f"{size:>5} {name:<10} {psnr(img, ref):>8.1f} {err:>7d} "
                  f"{seam_score(img, borders, borders):>6.3f} {seam_score(ref, borders, borders):>13.3f} "
                  f"{dt:>7.1f} {mem.rise / 2**20:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
