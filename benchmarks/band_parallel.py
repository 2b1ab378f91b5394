"""One denoising step (one UNet forward, CFG batch 2) on the CPU with 1, 2 and 3 single-thread
processes (gloo), side by side in one run: prints each step's seconds, the speed-ups, the bytes
each rank sent (measured) and the payload at 16384x8192 for SD1.5 and SD-XL (counted on the
meta device by parallel.traffic from the same code).

    python -m benchmarks.band_parallel [--size 512] [--width-div 2] [--procs 1,2,3] [--no-16k]

The UNet is the shipped SD1.5 config (random weights, LinFusion mounted) with its channel
widths divided by --width-div (2: a quarter of the FLOPs) so that one step takes seconds on one
thread: compute dominates, as it does at 8K-16K on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.ranks import add_arguments, each_count, speed


def _unet(width_div: int):
    from diffusers import UNet2DConditionModel

    from linfusion_cli.attention import apply_linfusion
    from linfusion_cli.planning.memory.planner import load_family_configs

    cfg = dict(load_family_configs("sd15")[0])
    cfg["block_out_channels"] = [c // width_div for c in cfg["block_out_channels"]]
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(cfg).eval()
    apply_linfusion(unet)
    return unet


def _inputs(size: int):
    g = torch.Generator().manual_seed(1)
    n = size // 8
    return (torch.randn(2, 4, n, n, generator=g), torch.tensor(500),
            torch.randn(2, 77, 768, generator=g))


def _setup(rank: int, nprocs: int, args):
    """This rank's step: the same random UNet and inputs on every rank; counts what it sent."""
    from linfusion_cli.bands.unet_forward import banded_forward
    from linfusion_cli.parallel import BandGroup

    unet = _unet(args.width_div)
    sample, t, context = _inputs(args.size)
    group = BandGroup(rank, nprocs) if nprocs > 1 else None

    def step() -> dict:
        if group is not None:
            group.sent.clear()
        with torch.inference_mode():
            out = banded_forward(unet, 1 << 20, False, sample, t, context, group=group).sample
        return {"out": out, "sent": dict(group.sent) if group is not None else {}}
    return step


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


def traffic_16k() -> list[str]:
    """Payload per step of rank 1 (interior for N > 2) at 16384x8192, fp16, CFG batch 2."""
    from linfusion_cli.parallel.traffic import ring_bytes, step_traffic
    from linfusion_cli.planning.memory.planner import load_family_configs
    from linfusion_cli.tracing.unet import _inputs as meta_inputs
    from linfusion_cli.tracing.unet import meta_unet

    lines = []
    for family in ("sd15", "sdxl"):
        cfg = load_family_configs(family)[0]
        unet = meta_unet(cfg, linfusion=True, projection_mid_dim=None if family != "sdxl" else 40)
        sample, t, context, kwargs = meta_inputs(unet, 2, 1024, 2048, torch.float16)
        for n in (2, 4, 8):
            sent = step_traffic(unet, sample, t, context, size=n, rank=1, **kwargs)
            ring = ring_bytes(sent, n)
            parts = ", ".join(f"{k} {_mib(v)}" for k, v in sorted(sent.items()))
            lines.append(f"  {family} N={n}: payload {parts}; on the wire (ring collectives) "
                         f"{_mib(sum(ring.values()))}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in px (latent = size / 8)")
    parser.add_argument("--width-div", type=int, default=2, help="SD1.5's channel widths divided by this")
    add_arguments(parser, repeat=2)
    parser.add_argument("--no-16k", action="store_true", help="skip the 16384x8192 traffic count")
    args = parser.parse_args()
    print(f"one UNet step, SD1.5 widths / {args.width_div}, {args.size}x{args.size} px, CFG batch 2, "
          f"fp32, one thread per process, {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f} before the run")
    results = each_count(_setup, args)
    first = next(iter(results))
    base = results[first]
    for n, r in results.items():
        out, want = r["ranks"][0]["out"], base["ranks"][0]["out"]
        rel = ((out - want).abs().max() / want.abs().max()).item()
        sent = [rank["sent"] for rank in r["ranks"]]
        most = max((sum(s.values()) for s in sent), default=0)
        kinds = json.dumps(sent[min(1, n - 1)]) if n > 1 else "{}"
        print(f"{speed(n, r, base, 'step')}; max rel. diff vs {first}: {rel:.1e}; most sent by a "
              f"rank {_mib(most)} (rank {min(1, n - 1)}: {kinds} bytes)")
    if not args.no_16k:
        print("payload per UNet step of rank 1 at 16384x8192 (latent 1024 rows x 2048), fp16, CFG batch 2:")
        for line in traffic_16k():
            print(line)


if __name__ == "__main__":
    main()
