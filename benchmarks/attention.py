"""LinFusion vs diffusers' default (SDPA) self-attention on this CPU: time, peak memory, scaling.

Each measurement runs in a fresh process (peak RSS is its own; benchmarks._measure). Prints a
table and the fitted exponent of time and memory in N. From the repo root:
    python -m benchmarks.attention [--quick]
"""

from __future__ import annotations

import math
import sys
import time

from benchmarks._measure import PeakRSS, run_isolated

DIM, HEADS, BATCH = 320, 8, 2


def layer_case(kind: str, tokens: int) -> dict:
    """Time one forward of a 320-channel, 8-head self-attention layer over `tokens` tokens."""
    import torch
    from diffusers.models.attention_processor import Attention

    from linfusion_cli.attention import LinFusionAttention

    torch.manual_seed(0)
    attn = Attention(DIM, heads=HEADS, dim_head=DIM // HEADS, out_bias=True).eval()
    layer = attn if kind == "sdpa" else LinFusionAttention.from_attention(attn).eval()
    x = torch.randn(BATCH, tokens, DIM)
    with torch.inference_mode():
        layer(x[:, :256])  # warm up kernels
        best = math.inf
        with PeakRSS(interval=None) as mem:
            for _ in range(1 if tokens >= 16384 else 3):
                start = time.perf_counter()
                layer(x)
                best = min(best, time.perf_counter() - start)
    return {"seconds": best, "extra_gib": mem.rise / 2**30}


def unet_case(kind: str, size: int) -> dict:
    """One tiny-UNet step (batch 2, as with guidance) at size x size latents."""
    import torch
    from diffusers import UNet2DConditionModel

    from linfusion_cli.attention import apply_linfusion
    from linfusion_cli.models.tiny import UNET_CONFIGS

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIGS["sd15"]).eval()
    if kind == "linfusion":
        apply_linfusion(unet)
    sample = torch.randn(2, 4, size, size)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.inference_mode():
        unet(sample[..., :16, :16], 10, context)
        start = time.perf_counter()
        unet(sample, 10, context)
        seconds = time.perf_counter() - start
    return {"seconds": seconds}


def fit_exponent(ns, values) -> float:
    """Least-squares slope of log(value) against log(N)."""
    xs, ys = [math.log(n) for n in ns], [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    quick = "--quick" in sys.argv
    both = [4096, 16384] if quick else [4096, 16384, 65536]
    alone = [] if quick else [262144, 1048576]
    print(f"one self-attention layer: {DIM} channels, {HEADS} heads, batch {BATCH}, fp32, CPU")
    print(f"{'tokens':>9} {'kind':>10} {'seconds':>9} {'peak GiB':>9} {'extra GiB':>9}")
    results = {}
    for n in both + alone:
        for kind in (["sdpa", "linfusion"] if n in both else ["linfusion"]):
            r = run_isolated("benchmarks.attention", "layer_case", kind=kind, tokens=n)
            if "error" in r:
                print(f"{n:>9} {kind:>10} failed: {r['error']}")
                continue
            results[(n, kind)] = r
            print(f"{n:>9} {kind:>10} {r['seconds']:>9.3f} {r['peak_rss_gib']:>9.2f} {r['extra_gib']:>9.2f}",
                  flush=True)
    for n in both:
        if (n, "sdpa") in results and (n, "linfusion") in results:
            ratio = results[(n, "sdpa")]["seconds"] / results[(n, "linfusion")]["seconds"]
            print(f"speed-up of LinFusion over SDPA at {n} tokens: {ratio:.1f}x")
    ns = [n for n in both + alone if (n, "linfusion") in results and n >= 16384]
    if len(ns) >= 2:
        t_exp = fit_exponent(ns, [results[(n, "linfusion")]["seconds"] for n in ns])
        m_exp = fit_exponent(ns, [max(results[(n, "linfusion")]["peak_rss_gib"], 1e-3) for n in ns])
        print(f"LinFusion scaling over N in {ns}: time ~ N^{t_exp:.2f}, peak RSS ~ N^{m_exp:.2f}")
    size = 128 if quick else 256
    unet = {k: run_isolated("benchmarks.attention", "unet_case", kind=k, size=size)
            for k in ("sdpa", "linfusion")}
    for k, r in unet.items():
        print(f"tiny UNet step at {size}x{size} latents ({k}): "
              + (f"{r['seconds']:.2f} s, peak {r['peak_rss_gib']:.2f} GiB" if "error" not in r else r["error"]))
    if all("error" not in r for r in unet.values()):
        print(f"tiny UNet speed-up with LinFusion: {unet['sdpa']['seconds'] / unet['linfusion']['seconds']:.1f}x")


if __name__ == "__main__":
    main()
