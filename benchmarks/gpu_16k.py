"""One CUDA GPU, at most ~5 minutes: does the memory planner's estimate hold at 4K-16K?

The real SD1.5 UNet and VAE architectures (the shipped configs, random weights; UNet fp16, VAE
bf16) with fresh LinFusion layers (apply_linfusion). Per case: one denoising step (UNet forward
on the classifier-free-guidance batch of 2 under the planner's MemoryPlan knobs, apply_knobs,
then a DDIM step) and one tiled decode (linfusion_cli.vae.decode, the plan's tile). Printed:
seconds, measured peaks (torch.cuda.max_memory_allocated / _reserved, and the activations above
what was allocated before each phase) next to the planner's estimate for the same config
(estimate.peak_breakdown; text encoders are not loaded, so they are left out of the figures
compared, though the plan is the one the CLI would choose). LinFusion against SDPA (the UNet's
own attention, remove_linfusion) where SDPA fits in time and memory. The 16384x8192 case runs
under the plan chosen for a 24 GiB budget with the allocator capped at 24 GiB minus the CUDA
context: PASS when it completes, FAIL on out-of-memory.

    python -m benchmarks.gpu_16k                 # the GPU run (exits 0 with a note without CUDA)
    python -m benchmarks.gpu_16k --dry           # the cases, plans and estimates; no GPU needed
    python -m benchmarks.gpu_16k --cpu-smoke     # tiny configs, small sizes, CPU: end to end
    python -m benchmarks.gpu_16k --json out.json # also write the results as JSON

Needs torch and diffusers (UNet2DConditionModel, AutoencoderKL, DDIMScheduler; no transformers).
On a machine without diffusers carry its wheel: `pip download --no-deps diffusers==0.42.1 -d .whl`
here, then there `pip install --no-index --no-deps --target /tmp/site .whl/diffusers-*.whl` and
`PYTHONPATH=/tmp/site python3 -m benchmarks.gpu_16k` from the repo root (its own needs, huggingface_hub,
safetensors, regex, filelock, requests, numpy, Pillow, are in the GPU image).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from benchmarks._measure import shipped_config
from linfusion_cli.errors import PlanError
from linfusion_cli.planning.memory import estimate as est
from linfusion_cli.planning.memory.planner import (
    GIB,
    MemoryPlan,
    choose_knobs,
)

TIME_LIMIT_S = 300.0
GUARD_S = 25.0  # stop starting cases this close to the limit
STEP_INDEX = -5  # the timestep of a strength-0.1 img2img step out of 50 (the 16K recipe)


@dataclass
class Case:
    name: str
    width: int
    height: int
    attention: str  # "linfusion" | "sdpa"
    budget_gib: float | None  # None: the device's whole memory (the loosest fitting plan)
    check: bool = False  # the PASS/FAIL case
    tight: bool = False  # every knob on (offload none): exercises skips_on_cpu on the GPU


@dataclass
class Setup:
    device: str
    unet_config: dict
    vae_config: dict
    dtype_bytes: int  # the UNet's
    cases: list[Case]
    total_gib: float
    results: list[dict] = field(default_factory=list)


GPU_CASES = [
    Case("4K", 4096, 4096, "linfusion", 24),
    Case("4K", 4096, 4096, "sdpa", 24),
    Case("16Kx8K", 16384, 8192, "linfusion", 24, check=True),
    Case("8K", 8192, 8192, "linfusion", 24),
    Case("16Kx8K all knobs", 16384, 8192, "linfusion", 24, tight=True),
    Case("8K", 8192, 8192, "sdpa", 24),
    Case("4K roomy", 4096, 4096, "linfusion", None),
    Case("16Kx8K", 16384, 8192, "sdpa", 24),
]


def smoke_cases(budget_gib: float) -> list[Case]:
    """The GPU list at 1/16 the side (tiny configs): same code paths, seconds on a CPU."""
    out = []
    for c in GPU_CASES:
        out.append(replace(c, width=c.width // 16, height=c.height // 16,
                           name=c.name.replace("16K", "1K").replace("8K", "512").replace("4K", "256"),
                           budget_gib=None if c.budget_gib is None else budget_gib))
    return out


def choose_plan(setup: Setup, case: Case) -> MemoryPlan:
    """The CLI's plan for the case's budget (text encoders counted, as the CLI would)."""
    budget = setup.total_gib if case.budget_gib is None else case.budget_gib
    lin = case.attention == "linfusion"
    if case.tight:
        plan = MemoryPlan(vae_tile_px=min(1024, max(case.width, case.height) // 2), ff_chunk=4096, cfg_split=True,
                          attn_chunk=4096 if lin else 0, inplace=True,
                          skips_on_cpu=setup.device == "cuda")
    else:
        plan = choose_knobs(setup.unet_config, setup.vae_config, width=case.width,
                           height=case.height, dtype_bytes=setup.dtype_bytes,
                           budget_bytes=int(budget * GIB), linfusion=lin, device=setup.device)
    return plan


def estimate(setup: Setup, case: Case, plan: MemoryPlan) -> dict:
    """The planner's figures for what this script loads (no text encoders)."""
    return est.peak_breakdown(setup.unet_config, setup.vae_config, width=case.width,
                              height=case.height, dtype_bytes=setup.dtype_bytes, batch=2,
                              knobs=plan.knobs(), linfusion=case.attention == "linfusion",
                              device=setup.device, text_encoders_bytes=0)


def knob_text(plan: MemoryPlan) -> str:
    bits = [f"offload={plan.offload}", f"tile={plan.vae_tile_px}"]
    bits += [f"ff={plan.ff_chunk}"] if plan.ff_chunk else []
    bits += [f"attn={plan.attn_chunk}"] if plan.attn_chunk else []
    bits += [n for n in ("cfg_split", "inplace", "skips_on_cpu") if getattr(plan, n)]
    return " ".join(bits)


def gib(x) -> str:
    return "   n/a" if x is None else f"{x / GIB:6.2f}"


# ---------------------------------------------------------------- running

class Meter:
    """Peak memory of one phase: CUDA allocator stats, or the CPU allocator via the profiler."""

    def __init__(self, device: str):
        import torch

        self.torch, self.device = torch, device

    def run(self, fn):
        """(result, seconds, peak allocated, peak reserved, allocated before)."""
        torch = self.torch
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            return (out, seconds, torch.cuda.max_memory_allocated(),
                    torch.cuda.max_memory_reserved(), before)
        from torch.profiler import ProfilerActivity, profile

        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        seconds = time.perf_counter() - start
        events = sorted((e for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]"), key=lambda e: e.start_ns())
        now = peak = 0
        for e in events:
            now += e.nbytes()
            peak = max(peak, now)
        return out, seconds, peak, None, 0  # activations only: weights predate the profile


def build_models(setup: Setup):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from linfusion_cli.attention import apply_linfusion

    dev = torch.device(setup.device)
    torch.manual_seed(0)
    with dev:  # random init straight on the device
        unet = UNet2DConditionModel.from_config(setup.unet_config)
        vae = AutoencoderKL.from_config(setup.vae_config)
    unet = unet.to(torch.float16 if setup.dtype_bytes == 2 else torch.float32).eval()
    vae = vae.to(torch.bfloat16 if setup.dtype_bytes == 2 else torch.float32).eval()
    apply_linfusion(unet)
    scheduler = DDIMScheduler.from_config(shipped_config("sd15", "scheduler"))
    scheduler.set_timesteps(50)
    return unet, vae, scheduler


def set_attention(unet, attention: str) -> None:
    from linfusion_cli.attention import (
        apply_linfusion,
        linfusion_layers,
        remove_linfusion,
    )

    if attention == "sdpa":
        remove_linfusion(unet)
    elif not linfusion_layers(unet):
        apply_linfusion(unet)


def place(unet, vae, phase: str, offload: str, device: str) -> None:
    """Where the weights live for a phase: offload "model" keeps only the running model on it."""
    if device != "cuda" or offload == "none":
        return
    if offload == "model":
        (vae if phase == "unet" else unet).to("cpu")
        (unet if phase == "unet" else vae).to(device)
    else:
        raise NotImplementedError("sequential offload is not emulated here (needs a pipeline)")


def run_case(setup: Setup, models, case: Case, plan: MemoryPlan, args) -> dict:
    import torch

    from linfusion_cli.pipeline.knobs import apply_knobs
    from linfusion_cli.vae import decode

    unet, vae, scheduler = models
    dev, dtype = setup.device, next(unet.parameters()).dtype
    set_attention(unet, case.attention)
    g = torch.Generator(dev).manual_seed(1)
    h, w = case.height // 8, case.width // 8
    latents = torch.randn(1, 4, h, w, generator=g, device=dev, dtype=dtype)
    context = torch.randn(2, 77, setup.unet_config["cross_attention_dim"], generator=g,
                          device=dev, dtype=dtype)
    t = scheduler.timesteps[STEP_INDEX]

    def step():
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)  # (2, 4, h, w)
        with torch.inference_mode():
            eps = unet(x, t, encoder_hidden_states=context).sample
            uncond, cond = eps.chunk(2)
            eps = uncond + 7.5 * (cond - uncond)
            return scheduler.step(eps, t, latents).prev_sample

    reports: list = []  # the decode's vae.TileReport
    place(unet, vae, "unet", plan.offload, dev)
    handle = apply_knobs(unet, vae, plan)
    try:
        new, u_s, u_alloc, u_res, u_before = Meter(dev).run(step)
        place(unet, vae, "vae", plan.offload, dev)
        _, v_s, v_alloc, v_res, v_before = Meter(dev).run(
            lambda: decode(vae, new, tile_px=plan.vae_tile_px, mode=args.vae_mode,
                           on_report=reports.append))
    finally:
        handle()
        if dev == "cuda" and plan.offload != "none":  # both back for the next case
            unet.to(dev)
            vae.to(dev)
    weights = sum(p.numel() * p.element_size() for m in (unet, vae) for p in m.parameters())
    return {"weights": weights, "unet_s": u_s, "unet_alloc": u_alloc, "unet_reserved": u_res,
            "unet_act": u_alloc - u_before, "vae_s": v_s, "vae_alloc": v_alloc,
            "vae_reserved": v_res, "vae_act": v_alloc - v_before,
            "vae_mode": reports[0].mode, "tiles": reports[0].tiles}


def oom_types():
    import torch

    return (torch.cuda.OutOfMemoryError, MemoryError)


def cleanup(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def report(case: Case, plan: MemoryPlan, e: dict, r: dict | None, note: str = "") -> dict:
    head = f"{case.name:18s} {case.attention:9s} [{knob_text(plan)}]"
    print(head)
    est_unet = e["unet_weights"] + e["unet_activations"]
    est_vae = e["vae_weights"] + e["vae_activations"]
    print(f"    estimate: UNet act {gib(e['unet_activations'])} (+weights {gib(est_unet)}), "
          f"VAE act {gib(e['vae_activations'])} (+weights {gib(est_vae)}), "
          f"planned peak {gib(e['total'])} GiB")
    row = {"case": case.name, "attention": case.attention, "width": case.width,
           "height": case.height, "plan": plan.to_dict(), "estimate": e, "note": note}
    if r is None:
        print(f"    {note}")
        return row
    ratio = lambda m, p: f"{m / p:4.2f}" if p else " n/a"
    print(f"    measured: UNet {r['unet_s']:7.2f} s act {gib(r['unet_act'])} "
          f"(meas/est {ratio(r['unet_act'], e['unet_activations'])}) "
          f"alloc {gib(r['unet_alloc'])} reserved {gib(r['unet_reserved'])}")
    print(f"              VAE  {r['vae_s']:7.2f} s act {gib(r['vae_act'])} "
          f"(meas/est {ratio(r['vae_act'], e['vae_activations'])}) "
          f"alloc {gib(r['vae_alloc'])} reserved {gib(r['vae_reserved'])} "
          f"[{r['vae_mode']}, {r['tiles']} tiles]")
    row.update(measured=r)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry", action="store_true", help="print the cases, plans and estimates")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU")
    ap.add_argument("--budget-gib", type=float, default=24.0, help="the checked budget")
    ap.add_argument("--vae-mode", default="estimated", choices=("estimated", "exact"),
                    help="tiled decode mode (exact parks tiles on the host: slower)")
    ap.add_argument("--time-limit", type=float, default=TIME_LIMIT_S)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    t0 = time.monotonic()

    if args.cpu_smoke:
        from linfusion_cli.models.tiny import UNET_CONFIGS, VAE_CONFIG

        unet_cfg = json.loads(json.dumps(UNET_CONFIGS["sd15"]))  # tuples -> lists
        vae_cfg = json.loads(json.dumps(VAE_CONFIG))
        setup = Setup("cpu", unet_cfg, vae_cfg, 4, smoke_cases(args.budget_gib), total_gib=4.0)
        if args.budget_gib == 24.0:  # default: halfway between the check case's loosest and
            check = next(c for c in setup.cases if c.check)  # tightest plans, so knobs engage
            kw = {"width": check.width, "height": check.height, "dtype_bytes": 4, "device": "cpu"}
            loose = est.estimate_peak_bytes(unet_cfg, vae_cfg, knobs=est.Knobs(), **kw)
            tight = est.estimate_peak_bytes(unet_cfg, vae_cfg, knobs=est.Knobs(
                vae_tile_px=512, ff_chunk=4096, cfg_split=True, attn_chunk=4096, inplace=True),
                **kw)
            budget = round((loose + tight) / 2 / GIB, 4)
            setup.cases = [replace(c, budget_gib=budget) if c.budget_gib else c
                           for c in setup.cases]
    else:
        unet_cfg, vae_cfg = shipped_config("sd15", "unet"), shipped_config("sd15", "vae")
        cases = [replace(c, budget_gib=args.budget_gib) if c.budget_gib else c for c in GPU_CASES]
        setup = Setup("cuda", unet_cfg, vae_cfg, 2, cases, total_gib=80.0)
        if not args.dry:
            import torch

            if not torch.cuda.is_available():
                print("gpu_16k: no CUDA device here; nothing measured (try --dry or --cpu-smoke)")
                return 0
            torch.cuda.init()
            free, total = torch.cuda.mem_get_info()
            setup.total_gib = total / GIB * 0.97
            print(f"device: {torch.cuda.get_device_name()} ({total / GIB:.1f} GiB), "
                  f"torch {torch.__version__}")

    check_budget = next(c.budget_gib for c in setup.cases if c.check)
    print(f"{'dry run: ' if args.dry else ''}{setup.device}, UNet dtype {setup.dtype_bytes} "
          f"bytes, budget {check_budget:g} GiB for the checked case; GiB below")
    plans = {}
    for case in setup.cases:
        try:
            plans[id(case)] = choose_plan(setup, case)
        except PlanError as err:
            plans[id(case)] = err
    if args.dry:
        for case in setup.cases:
            plan = plans[id(case)]
            if isinstance(plan, PlanError):
                print(f"{case.name:18s} {case.attention:9s} refused: {plan}")
                continue
            report(case, plan, estimate(setup, case, plan), None, note="(dry run)")
            if case.check:
                print(est.format_breakdown(estimate(setup, case, plan)))
        return 0

    import torch

    models = build_models(setup)
    context_bytes = 0
    if setup.device == "cuda":
        free, total = torch.cuda.mem_get_info()
        context_bytes = (total - free) - torch.cuda.memory_reserved()
        print(f"CUDA context and other processes: {context_bytes / GIB:.2f} GiB; "
              f"weights {torch.cuda.memory_allocated() / GIB:.2f} GiB; "
              f"built in {time.monotonic() - t0:.0f} s")
        warm = next(c for c in setup.cases if c.attention == "linfusion")
        run_case(setup, models, replace(warm, width=1024, height=1024), MemoryPlan(), args)
        run_case(setup, models, replace(warm, width=1024, height=1024, attention="sdpa"),
                 MemoryPlan(), args)
        cleanup("cuda")
    rate: dict[str, tuple[int, float]] = {}  # attention -> (tokens, seconds) of the last run
    verdict = None
    for case in setup.cases:
        plan = plans[id(case)]
        elapsed = time.monotonic() - t0
        if isinstance(plan, PlanError):
            setup.results.append({"case": case.name, "note": f"refused: {plan}"})
            print(f"{case.name:18s} {case.attention:9s} refused: {plan}")
            continue
        e = estimate(setup, case, plan)
        tokens = case.width * case.height
        if case.attention in rate:  # SDPA time grows with tokens^2, LinFusion with tokens
            n0, s0 = rate[case.attention]
            power = 2 if case.attention == "sdpa" else 1
            projected = s0 * (tokens / n0) ** power
        else:
            projected = 0.0
        left = args.time_limit - elapsed - GUARD_S
        if projected > left or left <= 0:
            note = (f"skipped: projected {projected:.0f} s, {max(left, 0):.0f} s left "
                    f"of the {args.time_limit:.0f} s limit")
            setup.results.append(report(case, plan, e, None, note))
            continue
        if plan.offload == "sequential":
            setup.results.append(report(case, plan, e, None, "skipped: sequential offload "
                                        "needs a pipeline (not emulated)"))
            continue
        cap = None
        if setup.device == "cuda" and case.budget_gib is not None:
            cap = (case.budget_gib * GIB - context_bytes) / torch.cuda.mem_get_info()[1]
            torch.cuda.set_per_process_memory_fraction(max(0.01, min(1.0, cap)))
        try:
            r = run_case(setup, models, case, plan, args)
            rate[case.attention] = (tokens, r["unet_s"] + r["vae_s"])
            row = report(case, plan, e, r)
            ok = None
            if case.check:
                if setup.device == "cuda":
                    peak = max(r["unet_reserved"], r["vae_reserved"])
                else:  # the profiler saw activations only
                    peak = r["weights"] + max(r["unet_act"], r["vae_act"])
                budget = case.budget_gib * GIB - (context_bytes if setup.device == "cuda" else 0)
                ok = peak <= budget
                verdict = ok if verdict is None else verdict and ok
                print(f"    {'PASS' if ok else 'FAIL'}: {case.width}x{case.height} peak "
                      f"{peak / GIB:.2f} GiB (+ context {context_bytes / GIB:.2f}) within "
                      f"{case.budget_gib:g} GiB")
            row["pass"] = ok
        except oom_types() as err:
            msg = str(err).splitlines()[0][:160]
            row = report(case, plan, e, None, f"out of memory: {msg}")
            if case.check:
                verdict = False
                print(f"    FAIL: out of memory within {case.budget_gib:g} GiB")
        finally:
            if cap is not None:
                torch.cuda.set_per_process_memory_fraction(1.0)
            cleanup(setup.device)
        setup.results.append(row)
    print(f"done in {time.monotonic() - t0:.0f} s; checked case: "
          f"{'not run' if verdict is None else 'PASS' if verdict else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps(setup.results, indent=1, default=str))
    return 0 if verdict is not False else 1


if __name__ == "__main__":
    sys.exit(main())
