"""Traced vs estimated UNet activation memory at real sizes, without a GPU.

For each family (the shipped SD1.5 / SD2.1 / SD-XL configs) and stage size, the planner picks
its plan for a 24 GiB GPU in fp16; the real diffusers UNet with LinFusion layers and that
plan's knobs runs one forward (guidance batch of 2) on the meta device under a live-bytes
counter (linfusion_cli.tracing.unet). Prints traced and estimated activation GiB, their ratio,
and the planner's whole-stage estimate (weights, VAE phase, margin) for context.

With --controlnet, one denoising step of an img2img stage with a tile ControlNet (built from
the UNet's config, as ControlNetModel.from_unet makes it) is traced instead
(linfusion_cli.tracing.adapters: controlnet(...) then unet(..., residuals)), against the step
estimate (planning.memory.adapter_estimate.controlnet_step_bytes); the plan is the one the runner would choose
beside it (the ControlNet's weights out of the budget, its step in the UNet's activations), or,
when none fits, the tightest plan. "stage est" then includes the ControlNet's weights.

    python -m benchmarks.memory_trace [--families sd15,sdxl] [--max-side 16384] [--controlnet]
"""

from __future__ import annotations

import argparse
import time

from linfusion_cli.planning.memory import estimate as est
from linfusion_cli.planning.memory.planner import BudgetError, choose_knobs, load_family_configs
from linfusion_cli.tracing.unet import meta_unet, trace_unet_bytes

GIB = 2 ** 30
SIZES = [(1024, 512), (2048, 1024), (4096, 2048), (8192, 4096), (16384, 8192)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="sd15,sd21,sdxl")
    parser.add_argument("--max-side", type=int, default=16384)
    parser.add_argument("--budget-gib", type=float, default=24.0)
    parser.add_argument("--controlnet", action="store_true",
                        help="trace a denoising step with a tile ControlNet (img2img stage)")
    parser.add_argument("--sizes", default="", help="WxH,... instead of the default ladder")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")] if args.sizes else SIZES
    print(f"{'family':6} {'size':>11} {'knobs':44} {'traced':>8} {'estimate':>8} {'ratio':>6} "
          f"{'stage est':>9} {'s':>5}")
    for family in args.families.split(","):
        unet_config, vae_config = load_family_configs(family)
        unet = meta_unet(unet_config, linfusion=True)
        cn = _controlnet(unet_config, unet) if args.controlnet else None
        for width, height in sizes:
            if width > args.max_side:
                continue
            if cn is not None:
                plan, traced, estimated, seconds, fits = _controlnet_row(
                    cn, unet_config, vae_config, unet, width, height, int(args.budget_gib * GIB))
            else:
                plan = choose_knobs(unet_config, vae_config, width=width, height=height,
                                   dtype_bytes=2, budget_bytes=int(args.budget_gib * GIB),
                                   device="cuda")
                start = time.perf_counter()
                traced = trace_unet_bytes(unet_config, width=width, height=height, knobs=plan,
                                          unet=unet)
                seconds = time.perf_counter() - start
                estimated = est.unet_activation_bytes(unet_config, latent_h=height // 8,
                                                      latent_w=width // 8, batch=2,
                                                      dtype_bytes=2, knobs=plan.knobs())
                fits = True
            knobs = (f"ff{plan.ff_chunk} cfg{int(plan.cfg_split)} attn{plan.attn_chunk} "
                     f"inp{int(plan.inplace)} skips{int(plan.skips_on_cpu)} {plan.offload}")
            print(f"{family:6} {width:>5}x{height:<5} {knobs:44} {traced / GIB:8.2f} "
                  f"{estimated / GIB:8.2f} {estimated / traced:6.3f} "
                  f"{plan.estimated_peak_gib:9.2f} {seconds:5.0f}"
                  f"{'' if fits else '  (no plan fits: tightest shown)'}", flush=True)


TILE_SOURCE = "from-unet"  # a hub id: the ControlNet from_unet makes of the UNet's config
TIGHTEST = dict(offload="sequential", vae_tile_px=512, ff_chunk=4096, cfg_split=True,
                attn_chunk=4096, inplace=True, skips_on_cpu=True)


def _controlnet(unet_config, unet):
    from linfusion_cli.adapters.controlnet import controlnet_config
    from linfusion_cli.tracing.adapters import meta_controlnet

    return meta_controlnet(controlnet_config(TILE_SOURCE, unet_config), unet)


def _controlnet_row(net, unet_config, vae_config, unet, width, height, budget):
    """(plan, traced, estimated step bytes, seconds, fits) for an img2img stage with the tile
    ControlNet, planned as the runner plans it."""
    from dataclasses import replace

    from linfusion_cli.adapters.controlnet import controlnet_config
    from linfusion_cli.planning.memory.adapter_estimate import controlnet_extra_bytes, controlnet_step_bytes, controlnet_unet_extra
    from linfusion_cli.tracing.adapters import trace_controlnet_step

    configs = [controlnet_config(TILE_SOURCE, unet_config)]  # the img2img stage runs the tile ControlNet
    where = dict(width=width, height=height, guidance=True, dtype_bytes=2)
    weights = controlnet_extra_bytes(configs, dtype_bytes=2)
    extra = controlnet_unet_extra(configs, unet_config, **where)
    common = dict(width=width, height=height, dtype_bytes=2, device="cuda", unet_extra=extra)
    try:
        plan, fits = choose_knobs(unet_config, vae_config, budget_bytes=max(budget - weights, 1),
                                 **common), True
    except BudgetError:
        plan, fits = choose_knobs(unet_config, vae_config, budget_bytes=1 << 62, fixed=TIGHTEST,
                                 **common), False
    plan = replace(plan, estimated_peak_gib=round(plan.estimated_peak_gib + weights / GIB, 2))
    start = time.perf_counter()
    traced = trace_controlnet_step(unet_config, configs, width=width, height=height, knobs=plan,
                                   unet=unet, nets=[net])
    seconds = time.perf_counter() - start
    estimated = controlnet_step_bytes(configs, unet_config, knobs=plan.knobs(), **where)
    return plan, traced, estimated, seconds, fits


if __name__ == "__main__":
    main()
