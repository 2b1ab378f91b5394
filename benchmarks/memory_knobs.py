"""Peak CPU memory of one tiny-UNet (+ LinFusion) denoising forward with each memory knob off/on.

Each configuration runs in a fresh process (benchmarks._measure.run_isolated); the figure is the
forward's rise in resident memory (benchmarks._measure.PeakRSS: the peak, ru_maxrss, above the
RSS just before the forward), next to the planner's estimate of the UNet activations for the
same config (estimate.unet_activation_bytes, fp32). On the CPU the "skips_on_cpu" knob is a
no-op (the skips are already in CPU memory): it only shows the hooks' cost. From the repo root:
    python -m benchmarks.memory_knobs [--latent 512] [--batch 2] [--only NAME ...]
"""

from __future__ import annotations

import argparse

from benchmarks._measure import PeakRSS, run_isolated

CONFIGS = {
    "baseline": {},
    "ff_chunk=4096": {"ff_chunk": 4096},
    "cfg_split": {"cfg_split": True},
    "inplace": {"inplace": True},
    "skips_on_cpu (no-op on CPU)": {"skips_on_cpu": True},
    "attn_chunk=4096": {"attn_chunk": 4096},
    "all of the above": {"ff_chunk": 4096, "cfg_split": True, "inplace": True,
                         "skips_on_cpu": True, "attn_chunk": 4096},
}


def measure(knobs: dict, latent: int, batch: int) -> dict:
    """One forward of the tiny sd15 UNet with LinFusion mounted, knobs applied (child process)."""
    import gc
    import time

    import torch
    from diffusers import UNet2DConditionModel

    from linfusion_cli.attention import apply_linfusion
    from linfusion_cli.pipeline.knobs import apply_knobs
    from linfusion_cli.planning.memory.planner import MemoryPlan
    from linfusion_cli.models.tiny import UNET_CONFIGS

    torch.set_num_threads(2)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIGS["sd15"]).eval()
    apply_linfusion(unet)
    apply_knobs(unet, None, MemoryPlan(**knobs))
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, latent, latent, generator=g)  # (B, 4, h, w)
    context = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g)  # (B, 7, D)
    gc.collect()
    start = time.perf_counter()
    with torch.inference_mode(), PeakRSS(interval=None) as mem:
        out = unet(sample, 500, encoder_hidden_states=context).sample
    seconds = time.perf_counter() - start
    return {"delta_mib": mem.rise / 2**20, "seconds": seconds,
            "checksum": float(out.double().abs().sum())}


def estimate_mib(knobs: dict, latent: int, batch: int) -> float:
    """The planner's UNet activation estimate for the same tiny config (fp32)."""
    from linfusion_cli.planning.memory.estimate import Knobs, unet_activation_bytes
    from linfusion_cli.models.tiny import UNET_CONFIGS

    return unet_activation_bytes(UNET_CONFIGS["sd15"], latent_h=latent, latent_w=latent,
                                 batch=batch, dtype_bytes=4, knobs=Knobs(**knobs)) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=512, help="latent side (image = 8x)")
    parser.add_argument("--batch", type=int, default=2, help="2 = classifier-free guidance")
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), metavar="NAME",
                        help="run only these rows (the first one is the output reference)")
    args = parser.parse_args()
    print(f"tiny sd15 UNet + LinFusion, latent {args.latent}x{args.latent} "
          f"(image {8 * args.latent} px), batch {args.batch}, fp32, CPU, 2 threads")
    print(f"{'knobs':<30}{'peak MiB':>10}{'est MiB':>10}{'seconds':>9}  same output")
    ref = None
    for name in args.only or CONFIGS:
        knobs = CONFIGS[name]
        r = run_isolated("benchmarks.memory_knobs", "measure", knobs=knobs, latent=args.latent,
                         batch=args.batch)
        if "error" in r:
            print(f"{name:<30}  error: {r['error']}")
            continue
        ref = ref if ref is not None else r["checksum"]
        same = abs(r["checksum"] - ref) <= 1e-5 * abs(ref)
        print(f"{name:<30}{r['delta_mib']:>10.0f}{estimate_mib(knobs, args.latent, args.batch):>10.0f}"
              f"{r['seconds']:>9.1f}  {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
