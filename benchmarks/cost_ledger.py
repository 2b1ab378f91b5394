"""The cost ledger's verdict on the headline runs: where the time of a 16K ladder goes, per GPU.

Plans SD1.5's ladder exactly as `linfusion generate --dry-run --gpu NAME --max-vram N` does (the
planner ranks the fitting plans by predicted seconds from the ledger: counts of the real forward
on the meta device, runtime/transfer.py's bytes), and prints per stage the knobs chosen, the
counted FLOPs, PCIe bytes and launches, compute seconds (FLOPs at the GPU's sustained rate)
and predicted seconds; then the run's totals and the predicted / compute ratio (1.0: compute-
bound). Predicted, not measured: no GPU has calibrated the model yet (benchmarks/gpu_16k.py).

    python -m benchmarks.cost_ledger                      # 16384^2 on 24 and 12 GiB; 16384x8192
    python -m benchmarks.cost_ledger --gpu rtx4090 --budget 24 --size 16384x16384
    python -m benchmarks.cost_ledger --gpu h100 --budget 24 --world-size 8   # one rank of 8
"""

from __future__ import annotations

import argparse

from linfusion_cli import api
from linfusion_cli.errors import PlanError


def knobs(memory) -> str:
    on = [f"offload={memory.offload}" if memory.offload != "none" else "",
          f"tile={memory.vae_tile_px}" if memory.vae_tile_px else "", "cfg_split" if memory.cfg_split else "",
          f"ff={memory.ff_chunk}" if memory.ff_chunk else "", "skips_on_cpu" if memory.skips_on_cpu else "",
          f"bands={memory.band_rows}" if memory.band_rows else ""]
    return " ".join(k for k in on if k) or "-"


def run(gpu: str, budget: float, width: int, height: int, world_size: int = 1) -> dict:
    """Plan one ladder and print its stages; returns the run's totals."""
    req = api.Request(prompt="x", preset="sd15", width=width, height=height, max_vram=budget,
                      device="cuda", dry_run=True, gpu=gpu, seed=1,
                      world_size=world_size if world_size > 1 else None)
    plan = api.plan_request(req)
    ranks = f", one rank of {world_size} (PCIe and peers: that rank's)" if world_size > 1 else ""
    print(f"\nSD1.5 {width}x{height} on {gpu}, {budget:g} GiB plan{ranks} (predicted, not measured)")
    print(f"{'stage':>12} {'knobs':<44} {'TFLOP':>8} {'PCIe GB':>8} {'peers GB':>8} {'launches':>9} "
          f"{'compute s':>9} {'predicted s':>11}")
    flops = pcie = peers = compute = 0.0
    for s in plan.stages:
        c = s.cost
        gb = (c["host_to_device_bytes"] + c["device_to_host_bytes"]) / 1e9
        print(f"{s.width:>6}x{s.height:<5} {knobs(s.memory):<44} {c['flops'] / 1e12:>8.1f} {gb:>8.1f} "
              f"{c['peer_bytes'] / 1e9:>8.1f} {c['launches']:>9} {c['compute_s']:>9.2f} "
              f"{c['predicted_s']:>11.2f}")
        flops, pcie, compute = flops + c["flops"], pcie + gb, compute + c["compute_s"]
        peers += c["peer_bytes"] / 1e9
    ratio = plan.predicted_s / compute if compute else float("nan")
    print(f"{'run':>12} {'':<44} {flops / 1e12:>8.1f} {pcie:>8.1f} {peers:>8.1f} {'':>9} {compute:>9.2f} "
          f"{plan.predicted_s:>11.2f}   predicted/compute {ratio:.2f}")
    return {"pcie_gb": pcie, "compute_s": compute, "predicted_s": plan.predicted_s, "ratio": ratio}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default=None)
    ap.add_argument("--budget", type=float, default=None)
    ap.add_argument("--size", default=None, help="WxH")
    ap.add_argument("--world-size", type=int, default=1, help="band-parallel ranks (one is priced)")
    args = ap.parse_args(argv)
    if args.gpu or args.budget or args.size or args.world_size > 1:
        w, h = (int(x) for x in (args.size or "16384x16384").split("x"))
        cases = [(args.gpu or "h100", args.budget or 24, w, h, args.world_size)]
    else:
        cases = [("h100", 24, 16384, 16384), ("h100", 12, 16384, 16384), ("h100", 24, 16384, 8192),
                 ("rtx4090", 24, 16384, 16384), ("rtx3060", 12, 16384, 16384)]
    for gpu, budget, w, h, *ranks in cases:
        try:
            run(gpu, budget, w, h, *ranks)
        except PlanError as exc:
            print(f"\nSD1.5 {w}x{h} on {gpu}, {budget:g} GiB: {exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
