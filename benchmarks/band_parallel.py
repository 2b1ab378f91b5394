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
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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


def _rank(rank: int, nprocs: int, store: str, args, out: str) -> None:
    """One rank: a warm-up step, then `repeat` timed steps between barriers."""
    from linfusion_cli.bands.unet import banded_forward
    from linfusion_cli.parallel import BandGroup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=nprocs)
    unet = _unet(args.width_div)
    sample, t, context = _inputs(args.size)
    group = BandGroup(rank, nprocs) if nprocs > 1 else None
    times, cpu = [], []
    with torch.inference_mode():
        for i in range(args.repeat + 1):
            if group is not None:
                group.sent.clear()
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            result = banded_forward(unet, 1 << 20, False, sample, t, context, group=group).sample
            used = time.process_time() - start_cpu
            dist.barrier()
            if i:
                times.append(time.perf_counter() - start)
                cpu.append(used)
    torch.save({"seconds": min(times), "cpu": min(cpu), "sent": dict(group.sent) if group else {},
                "out": result}, f"{out}/{nprocs}-{rank}.pt")
    dist.destroy_process_group()


def _timed(nprocs: int, args, out: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(nprocs, os.path.join(tmp, "store"), args, out), nprocs=nprocs, join=True)
    ranks = [torch.load(f"{out}/{nprocs}-{r}.pt") for r in range(nprocs)]
    return {"seconds": max(r["seconds"] for r in ranks), "cpu": max(r["cpu"] for r in ranks),
            "sent": [r["sent"] for r in ranks], "out": ranks[0]["out"]}


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
    parser.add_argument("--procs", default="1,2,3", help="process counts to time")
    parser.add_argument("--repeat", type=int, default=2, help="timed steps per count (the fastest is kept)")
    parser.add_argument("--no-16k", action="store_true", help="skip the 16384x8192 traffic count")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    procs = [int(p) for p in args.procs.split(",")]
    print(f"one UNet step, SD1.5 widths / {args.width_div}, {args.size}x{args.size} px, CFG batch 2, "
          f"fp32, one thread per process, {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f} before the run")
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for n in procs:
            results[n] = _timed(n, args, out)
    base = results[procs[0]]
    for n, r in results.items():
        rel = ((r["out"] - base["out"]).abs().max() / base["out"].abs().max()).item()
        sent = max((sum(s.values()) for s in r["sent"]), default=0)
        kinds = json.dumps({k: v for k, v in r["sent"][min(1, n - 1)].items()}) if n > 1 else "{}"
        print(f"  {n} process{'es' if n > 1 else ''}: {r['seconds']:.2f} s/step, speed-up "
              f"{base['seconds'] / r['seconds']:.2f}x; CPU time of the busiest rank "
              f"{r['cpu']:.2f} s ({base['cpu'] / r['cpu']:.2f}x less); max rel. diff vs "
              f"{procs[0]}: {rel:.1e}; most sent by a rank {_mib(sent)} (rank {min(1, n - 1)}: "
              f"{kinds} bytes)")
    if not args.no_16k:
        print("payload per UNet step of rank 1 at 16384x8192 (latent 1024 rows x 2048), fp16, CFG batch 2:")
        for line in traffic_16k():
            print(line)


if __name__ == "__main__":
    main()
