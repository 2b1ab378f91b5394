"""The tiled VAE decode shared by 1, 2 and 3 single-thread CPU processes (gloo), side by side in
one run: seconds per decode, speed-ups, the largest pixel difference from one process; then, at
16384x16384 for the SD VAE (counted on the meta device from the same code), one rank's traced
peak of the latent-resolution part and the bytes it sends, against one process's.

    python -m benchmarks.vae_parallel [--size 512] [--tile 256] [--procs 1,2,3] [--no-16k]

The VAE is the shipped SD1.5 VAE config with random weights, fp32, exact statistics (tiles in
lock step, moments pooled over every rank's tiles).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from benchmarks.ranks import add_arguments, each_count, speed

CONFIG = os.path.join(os.path.dirname(__file__), "..", "linfusion_cli", "models", "configs", "sd15_vae.json")
GIB = 2 ** 30


def _config() -> dict:
    with open(CONFIG) as f:
        return json.load(f)


def _setup(rank: int, nprocs: int, args):
    """This rank's decode: the same random VAE and latent on every rank."""
    from diffusers import AutoencoderKL

    from benchmarks.synthetic import structured_latent
    from linfusion_cli.parallel import BandGroup
    from linfusion_cli.vae import decode

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(_config()).eval()
    latent = structured_latent(args.size // 8, args.size // 8, seed=1)
    group = BandGroup(rank, nprocs) if nprocs > 1 else None
    return lambda: {"image": decode(vae, latent, tile_px=args.tile, mode="exact", group=group)}


def memory_16k() -> list[str]:
    """Rank 1's traced peak of the decode's latent-resolution part at 16384x16384 (bf16, CUDA's
    exact-attention limit: windowed here), band_rows 64, and what it sends."""
    from linfusion_cli.parallel.traffic import CountingGroup
    from linfusion_cli.tracing.unet import meta_vae, trace_vae_whole_bytes

    cfg = _config()
    vae = meta_vae(cfg)
    kw = dict(width=16384, height=16384, band_rows=64, token_limit=1 << 20, vae=vae, tile_px=2048)
    alone = trace_vae_whole_bytes(cfg, **kw)
    lines = [f"  1 process: {alone / GIB:.2f} GiB"]
    for n in (2, 4, 8):
        group = CountingGroup(1, n, "meta")
        peak = trace_vae_whole_bytes(cfg, group=group, **kw)
        sent = ", ".join(f"{k} {v / 2 ** 20:.1f} MiB" for k, v in sorted(group.sent.items()))
        lines.append(f"  rank 1 of {n}: {peak / GIB:.2f} GiB ({alone / peak:.1f}x less); sends {sent}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in px")
    parser.add_argument("--tile", type=int, default=256, help="VAE tile in px")
    add_arguments(parser, repeat=1)
    parser.add_argument("--no-16k", action="store_true", help="skip the 16384x16384 memory trace")
    args = parser.parse_args()
    print(f"tiled VAE decode, SD VAE (random weights), {args.size}x{args.size} px, tiles of "
          f"{args.tile} px, exact statistics, fp32, one thread per process, {os.cpu_count()} CPU "
          f"cores, load average {os.getloadavg()[0]:.1f} before the run")
    results = each_count(_setup, args)
    first = next(iter(results))
    base = results[first]
    for n, r in results.items():
        image, want = r["ranks"][0]["image"], base["ranks"][0]["image"]
        diff = np.abs(image.astype(int) - want.astype(int)).max()
        print(f"{speed(n, r, base, 'decode')}; max difference vs {first}: {diff} levels")
    if not args.no_16k:
        print("latent-resolution part of a 16384x16384 decode (bf16, band_rows 64), traced peak:")
        for line in memory_16k():
            print(line)


if __name__ == "__main__":
    main()
