"""The work of one UNet forward, whole and band-wise, counted on the meta device (no weights, no
GPU): total and convolution TFLOP (torch's FlopCounterMode) and the aten ops that are not views
(a proxy for kernel launches), band-wise with skips on the device and parked (skips_on_cpu),
each with its ratio to the whole forward.

    python -m benchmarks.band_flops [--size 2048] [--rows 64] [--batch 2] [--family sd15]
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="image side in px (latent = size / 8)")
    parser.add_argument("--rows", type=int, default=64, help="band_rows")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2: guidance)")
    parser.add_argument("--family", default="sd15")
    args = parser.parse_args()
    from linfusion_cli.planning.memory.planner import MemoryPlan, load_family_configs
    from linfusion_cli.tracing.unet import meta_unet
    from linfusion_cli.tracing.ledger import unet_call_cost as unet_work

    unet = meta_unet(load_family_configs(args.family)[0], linfusion=True)
    plans = {"whole": MemoryPlan(), "banded": MemoryPlan(band_rows=args.rows),
             "banded, parked skips": MemoryPlan(band_rows=args.rows, skips_on_cpu=True)}
    work = {name: unet_work(unet, width=args.size, height=args.size, knobs=plan, batch=args.batch)
            for name, plan in plans.items()}
    print(f"{args.family} UNet forward, {args.size}x{args.size} px, batch {args.batch}, "
          f"band_rows {args.rows} (meta device)")
    whole = work["whole"]
    for name, w in work.items():
        print(f"  {name:21s} total {w.flops / 1e12:6.2f} TFLOP ({w.flops / whole.flops:.3f})  "
              f"conv {w.conv_flops / 1e12:6.2f} TFLOP ({w.conv_flops / whole.conv_flops:.3f})  "
              f"aten ops {w.launches:6d} ({w.launches / whole.launches:.2f})")


if __name__ == "__main__":
    main()
