"""Traced vs estimated UNet activation memory at real sizes, without a GPU.

For each family (the shipped SD1.5 / SD2.1 / SD-XL configs) and stage size, the planner picks
its plan for a 24 GiB GPU in fp16; the real diffusers UNet with LinFusion layers and that
plan's knobs runs one forward (guidance batch of 2) on the meta device under a live-bytes
counter (linfusion_cli.planning.memory.trace). Prints traced and estimated activation GiB, their ratio,
and the planner's whole-stage estimate (weights, VAE phase, margin) for context.

    python -m benchmarks.memory_trace [--families sd15,sdxl] [--max-side 16384]
"""

from __future__ import annotations

import argparse
import time

from linfusion_cli.planning.memory import estimate as est
from linfusion_cli.planning.memory.planner import load_family_configs, choose_knobs
from linfusion_cli.planning.memory.trace import meta_unet, trace_unet_bytes

GIB = 2 ** 30
SIZES = [(1024, 512), (2048, 1024), (4096, 2048), (8192, 4096), (16384, 8192)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="sd15,sd21,sdxl")
    parser.add_argument("--max-side", type=int, default=16384)
    parser.add_argument("--budget-gib", type=float, default=24.0)
    args = parser.parse_args()
    print(f"{'family':6} {'size':>11} {'knobs':44} {'traced':>8} {'estimate':>8} {'ratio':>6} "
          f"{'stage est':>9} {'s':>5}")
    for family in args.families.split(","):
        unet_config, vae_config = load_family_configs(family)
        unet = meta_unet(unet_config, linfusion=True)
        for width, height in SIZES:
            if width > args.max_side:
                continue
            plan = choose_knobs(unet_config, vae_config, width=width, height=height, dtype_bytes=2,
                               budget_bytes=int(args.budget_gib * GIB), device="cuda")
            start = time.perf_counter()
            traced = trace_unet_bytes(unet_config, width=width, height=height, knobs=plan,
                                      unet=unet)
            seconds = time.perf_counter() - start
            estimated = est.unet_activation_bytes(unet_config, latent_h=height // 8,
                                                  latent_w=width // 8, batch=2, dtype_bytes=2,
                                                  knobs=plan.knobs())
            knobs = (f"ff{plan.ff_chunk} cfg{int(plan.cfg_split)} attn{plan.attn_chunk} "
                     f"inp{int(plan.inplace)} skips{int(plan.skips_on_cpu)} {plan.offload}")
            print(f"{family:6} {width:>5}x{height:<5} {knobs:44} {traced / GIB:8.2f} "
                  f"{estimated / GIB:8.2f} {estimated / traced:6.3f} "
                  f"{plan.estimated_peak_gib:9.2f} {seconds:5.0f}", flush=True)


if __name__ == "__main__":
    main()
