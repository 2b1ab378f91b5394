"""One CUDA GPU, one command, 8 minutes: do the memory planner and the cost ledger hold on a GPU?

Nothing in this package has run on CUDA yet: the planner's allowances (20% for allocator
fragmentation and cuDNN workspaces, 0.75 GiB of CUDA context) and the cost ledger's time model
(linfusion_cli/gpus.py: half the dense tensor rate sustained, PCIe shares, launch overhead) are
datasheet guesses. This script measures, on the GPU it finds, what they predict, and writes each
measured time beside the ledger's prediction (tracing/ledger.py counts FLOPs, launches, syncs and
PCIe bytes of the real code on the meta device; gpus.predict turns the counts into seconds for the
GPU found, gpus.detected_gpu). Models: the shipped SD1.5 / SD-XL configs with random weights
(UNet fp16, VAE bf16) and fresh LinFusion layers (apply_linfusion); nothing is downloaded.

    python -m benchmarks.gpu_16k --json OUT.json    # the GPU run (exits 0 with a note without CUDA)
    python -m benchmarks.gpu_16k --dry              # cases, plans, estimates, predictions; no GPU
    python -m benchmarks.gpu_16k --cpu-smoke --json OUT.json   # every case, tiny, CPU (~30 s)

Flags: --budget-s S (480: no case starts with fewer than 40 s left), --budget-gib G (24: the
budget the 16K plan is chosen for and the allocator capped at), --ledger-cache DIR (the ledger's
counts; default the CLI's, ~/.cache/linfusion/ledger; none for --cpu-smoke).

On the lent GPU machine (no internet), from the repo root. It needs torch and diffusers
(UNet2DConditionModel, AutoencoderKL; not transformers). Carry diffusers as a wheel: here
`pip download --no-deps diffusers==0.42.1 -d .whl` (transformers likewise, should a case ever
need it), there `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and
`PYTHONPATH=/tmp/site python3 -m benchmarks.gpu_16k --json OUT.json` (diffusers' own needs,
huggingface_hub, safetensors, regex, filelock, requests, numpy, Pillow, are in the GPU image).
The ledger's counts take about 1.5 min of CPU (3.5 min on a shared 2-core machine), mostly to
price the 16K plan; to spend none of the lease on them, count them here first into a folder that
travels with the tree (untracked, not ignored): `python -m benchmarks.gpu_16k --dry --ledger-cache
.ledger` here, and add `--ledger-cache .ledger` there. The JSON is rewritten (atomically) after
every step, so a crash or a timeout keeps what ran; progress goes to stderr, a table to stdout.

Cases, in order (each under its own try/except):
  unet_bands       SD1.5 2048^2 batch 2 (CFG): whole UNet forward vs band-wise (band_rows 64);
                   time of each and the max abs difference of their fp16 outputs.
  unet_16k         SD1.5 16384x8192 batch 2 on the plan choose_knobs picks for --budget-gib (its
                   fitting frontier priced by the ledger, as the CLI on CUDA does; the UNet phase
                   only: a VAE phase's count at 16K takes minutes), the allocator capped at the
                   budget minus what is used outside PyTorch (set_per_process_memory_fraction).
  vae_decode_tile  one tile of the plan's size through the tiled VAE (linfusion_cli.vae.decode /
  vae_encode_tile  encode), exact statistics, the plan's band_rows and device_budget (if taken).
  vae_attention    the VAE mid-block's exact global attention over 1024^2 = 1M tokens (bf16).
  unet_layout      SD1.5 2048^2 whole: channels_last and cudnn.benchmark, each on and off.
  sdxl_dilated     SD-XL 4096^2 batch 2: plain vs DemoFusion's dilated pass (convs dilated x4).
Each UNet time is one guided forward (a denoising step less its scheduler arithmetic), after
one warm-up call; the median of 3 (1 for unet_16k and vae_attention).

The JSON (bytes in bytes, times in seconds, GB = 1e9 bytes):
  script, mode ("gpu" | "cpu-smoke" | "dry"), argv, budget_s, elapsed_s (so far), done (false
  until the last case ended: a killed run stays false)
  gpu_model        the gpus.GPUS entry the predictions are for (detected; h100 off CUDA): name,
                   memory_gib, sustained_tflops, pinned_gbps, pageable_gbps, launch_us, dense_tflops
  preflight        python, torch, cuda, cudnn, diffusers versions, cpu_count; device (name),
                   capability ("9.0"), multiprocessors, total_bytes / free_bytes (mem_get_info),
                   outside_torch_bytes (used minus reserved: the CUDA context); copy: bytes (256
                   MiB), repeats, pinned / pageable: {h2d_gbps, d2h_gbps} (best of the repeats,
                   CUDA events), model_pinned_gbps / model_pageable_gbps (what gpus.py assumes).
                   CUDA-only fields are null on the CPU.
  cases.NAME       status: "running" (started, never ended: the run was killed there), "ok",
                   "oom" (out of memory: a finding), "error" (error, traceback), "skipped" (note:
                   the time guard); what (one line); wall_s (the case, ledger counts included);
                   setup (sizes, dtypes, knobs); runs; case-specific fields below.
    runs.VARIANT   time_s (median of times_s); times_s; max_allocated_bytes, max_reserved_bytes
                   (torch.cuda peaks over the warm-up and the repeats); outside_torch_bytes (used
                   minus reserved, after); cost (the ledger's counts: flops, conv_flops, h2d_bytes,
                   d2h_bytes, blocking_bytes, launches, syncs); cost_source ("UnetLedger": the
                   planner's count; "VaeLedger"; "counted": the measured call once more under
                   tracing.ledger.counting; "counted (meta)": on the meta device, one SDPA call as
                   on CUDA); predicted (gpus.predict: compute_s, launch_s, async_copy_s,
                   blocking_s, predicted_s); measured_over_predicted; achieved_tflops (ledger FLOPs
                   / time_s); share_of_dense (achieved / the datasheet dense rate: what
                   gpus.SUSTAINED_SHARE, 0.5 today, should be). Dry runs: predictions only.
    unet_bands     max_abs_diff, max_abs_output (whole vs band-wise outputs)
    unet_16k       setup.plan (the MemoryPlan; its estimated_peak_gib counts text encoders, as the
                   CLI does), setup.estimate (estimate.peak_breakdown of what is loaded here: no
                   text encoders), setup.cap_fraction; check {budget_bytes, measured_device_bytes
                   (max reserved + outside PyTorch), fits}; versus_estimate {estimated_total_bytes
                   (with margin and context), measured_over_estimated, estimated_unet_bytes
                   (weights + activations, no margin), max_allocated_bytes,
                   allocated_over_estimated}; at_oom (the peaks when it ran out of memory)
    vae_*_tile     report (the TileReport), tiles_at_full_size (of the 16K pass)
    vae_attention  exact (global, not windowed), fused_sdpa (flash / memory-efficient kernel; false:
                   query chunks of bounded scores)
    sdxl_dilated   dilation; the ledger cannot see dilation (same FLOPs): one prediction for both
Exit status 1 when unet_16k ran out of memory or measured above its budget, else 0.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

from benchmarks._measure import shipped_config
from linfusion_cli.planning.memory import estimate as est
from linfusion_cli.planning.memory.planner import GIB, MemoryPlan, choose_knobs, load_family_configs

BUDGET_S = 480.0  # the whole run: 8 minutes of a 15-minute lease
GUARD_S = 40.0  # no case starts with less than this left
COPY_BYTES = 256 << 20
COPY_REPEATS = 3
RECIPE_DENOISE_STEPS = 5  # the 16K stage of the README's recipe: 50 steps at strength 0.1
GUIDANCE = 7.5
STARTED = time.monotonic()  # the budget's clock


def log(msg: str) -> None:
    """Progress goes to stderr, stamped with seconds since start (stdout carries the table)."""
    print(f"[{time.monotonic() - STARTED:5.0f} s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- sizes and models

@dataclass(frozen=True)
class Sizes:
    """What each case runs at: the GPU sizes, or tiny ones for the CPU smoke."""

    device: str
    unet_dtype: str  # "float16" | "float32"
    vae_dtype: str  # "bfloat16" | "float32"
    sd15: dict
    vae: dict
    sdxl: dict
    step_px: int  # unet_bands / unet_layout side
    band_rows: int
    big: tuple[int, int]  # unet_16k (width, height)
    budget_gib: float
    attn_side: int  # vae_attention: latent px a side (tokens = side^2)
    sdxl_px: int
    sdxl_trained_px: int  # DemoFusion's dilation = ceil(sdxl_px / this)
    repeats: int
    repeats_big: int
    fixed: dict | None = None  # knobs the 16K plan must have (choose_knobs' `fixed`)

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.unet_dtype == "float16" else 4

    @property
    def vae_bytes(self) -> int:
        return 2 if self.vae_dtype == "bfloat16" else 4


def gpu_sizes(budget_gib: float) -> Sizes:
    """The shipped SD1.5 / SD-XL configs at the sizes the brief asks for."""
    sd15, vae = load_family_configs("sd15")
    return Sizes("cuda", "float16", "bfloat16", sd15, vae, shipped_config("sdxl", "unet"),
                 step_px=2048, band_rows=64, big=(16384, 8192), budget_gib=budget_gib,
                 attn_side=1024, sdxl_px=4096, sdxl_trained_px=1024, repeats=3, repeats_big=1)


def smoke_sizes() -> Sizes:
    """Tiny configs (linfusion_cli.models.tiny) and sides that run each case in seconds on a CPU.
    Their VAE phase sets every plan's peak, so no budget makes the planner turn UNet knobs on:
    the 16K plan is given bands, tiles and CFG split (`fixed`) to take the same code paths."""
    from linfusion_cli.models.tiny import UNET_CONFIGS, VAE_CONFIG

    plain = lambda c: json.loads(json.dumps(c))  # noqa: E731 (tuples -> lists, as a config file)
    return Sizes("cpu", "float32", "float32", plain(UNET_CONFIGS["sd15"]), plain(VAE_CONFIG),
                 plain(UNET_CONFIGS["sdxl"]), step_px=256, band_rows=8, big=(1024, 512),
                 budget_gib=1.0, attn_side=64, sdxl_px=512, sdxl_trained_px=256, repeats=1,
                 repeats_big=1, fixed={"band_rows": 16, "vae_tile_px": 512, "cfg_split": True})


def dtype_of(name: str):
    import torch

    return getattr(torch, name)


def build_unet(config: dict, sizes: Sizes):
    """A random UNet of `config` on the device, in the UNet dtype, LinFusion mounted."""
    import torch
    from diffusers import UNet2DConditionModel

    from linfusion_cli.attention import apply_linfusion

    torch.manual_seed(0)
    with torch.device(sizes.device):  # random init straight on the device
        unet = UNet2DConditionModel.from_config(config)
    unet = unet.to(dtype_of(sizes.unet_dtype)).eval()
    apply_linfusion(unet)
    return unet


def build_vae(sizes: Sizes):
    """A random SD VAE on the device, in the VAE dtype."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    with torch.device(sizes.device):
        vae = AutoencoderKL.from_config(sizes.vae)
    return vae.to(dtype_of(sizes.vae_dtype)).eval()


def unet_inputs(unet, px_w: int, px_h: int, batch: int = 2, seed: int = 2):
    """Random (sample, t, kwargs) for one guided UNet call at (px_w, px_h), on its device."""
    import torch

    p = next(unet.parameters())
    g = torch.Generator(p.device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=p.device, dtype=p.dtype)

    cfg = unet.config
    kwargs = {"encoder_hidden_states": rand(batch, 77, cfg.cross_attention_dim)}
    if cfg.addition_embed_type == "text_time":  # SD-XL: pooled text and size conditioning
        text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        ids = torch.tensor([[px_h, px_w, 0, 0, px_h, px_w]] * batch, device=p.device, dtype=p.dtype)
        kwargs["added_cond_kwargs"] = {"text_embeds": rand(batch, text), "time_ids": ids}
    sample = rand(batch, cfg.in_channels, px_h // 8, px_w // 8)
    return sample, torch.tensor(500, device=p.device), kwargs


def knob_text(plan) -> str:
    """The knobs that are on, for a terminal."""
    default = est.Knobs()
    on = [f"{k}={v}" for k, v in vars(plan.knobs()).items() if v != getattr(default, k)]
    return " ".join(on) or "no knobs"


# ---------------------------------------------------------------- the record

class Record:
    """The JSON file, rewritten whole (atomically) after every change, so a kill keeps what ran."""

    def __init__(self, path: Path | None, data: dict):
        self.path, self.data = path, data

    def flush(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


@dataclass
class Bench:
    """One run's sizes, clock, record, models and ledgers (shared by the cases)."""

    sizes: Sizes
    record: Record
    dry: bool
    budget_s: float
    ledger_cache: Path | None
    gpu: object = None  # gpus.Gpu predictions are made for
    t0: float = STARTED
    models: dict = field(default_factory=dict)
    ledgers: dict = field(default_factory=dict)
    plan_16k: MemoryPlan | None = None

    @property
    def cuda(self) -> bool:
        """Measuring on a CUDA device (not a dry run, not the CPU smoke)."""
        return self.sizes.device == "cuda" and not self.dry

    def save(self) -> None:
        """Stamp the elapsed time and write the record."""
        self.record.data["elapsed_s"] = time.monotonic() - self.t0
        self.record.flush()

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def model(self, name: str):
        """The SD1.5 UNet ("sd15") or the VAE ("vae"), built once."""
        if name not in self.models:
            log(f"  building {name} ...")
            self.models[name] = build_vae(self.sizes) if name == "vae" else build_unet(
                self.sizes.sd15, self.sizes)
        return self.models[name]

    def unet_ledger(self, config: dict):
        """The tracing.ledger.UnetLedger of a UNet config (LinFusion on, the UNet dtype)."""
        from linfusion_cli.tracing.ledger import UnetLedger

        key = json.dumps(config, sort_keys=True)
        if key not in self.ledgers:
            self.ledgers[key] = UnetLedger(config, linfusion=True, cache=self.ledger_cache,
                                           dtype=dtype_of(self.sizes.unet_dtype))
        return self.ledgers[key]


# ---------------------------------------------------------------- measuring

def sync(bench: Bench) -> None:
    import torch

    if bench.cuda:
        torch.cuda.synchronize()


def clean(bench: Bench) -> None:
    """Free what the last case left (cached blocks too), so peaks start from the weights."""
    import torch

    gc.collect()
    if bench.cuda:
        torch.cuda.empty_cache()


def outside_torch() -> int:
    """Device bytes in use that PyTorch's allocator does not hold (context, other processes)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return (total - free) - torch.cuda.memory_reserved()


def peaks(bench: Bench) -> dict:
    """The allocator's peaks since the last reset and what is used outside it now (CUDA only)."""
    import torch

    if not bench.cuda:
        return {"max_allocated_bytes": None, "max_reserved_bytes": None, "outside_torch_bytes": None}
    return {"max_allocated_bytes": torch.cuda.max_memory_allocated(),
            "max_reserved_bytes": torch.cuda.max_memory_reserved(),
            "outside_torch_bytes": outside_torch()}


def timed(bench: Bench, fn, repeats: int) -> tuple[dict, object]:
    """fn's seconds (one warm-up call, then `repeats` timed ones) and CUDA peaks over all of them;
    returns (the run record, fn's last output)."""
    import torch

    clean(bench)
    if bench.cuda:
        torch.cuda.reset_peak_memory_stats()
    times, out = [], None
    with torch.inference_mode():
        for i in range(repeats + 1):
            del out
            sync(bench)
            start = time.perf_counter()
            out = fn()
            sync(bench)
            if i:  # the first call warms up (cuDNN autotuning, lazy inits)
                times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times), "times_s": times, **peaks(bench)}, out


def counted(fn):
    """The Cost of one more call of fn, counted by the ledger's own counters
    (tracing.ledger.counting: FLOPs, launches, syncs, copies through runtime/transfer)."""
    from linfusion_cli.tracing.ledger import counting

    with counting() as tally:
        fn()
    return tally.cost()


def with_prediction(bench: Bench, run: dict, cost, source: str) -> dict:
    """The run record with the ledger's counts, predicted seconds and the measured ratios."""
    from linfusion_cli.gpus import predict

    if cost is None:
        return {**run, "cost": None, "cost_source": source, "predicted": None,
                "measured_over_predicted": None, "achieved_tflops": None, "share_of_dense": None}
    parts = predict(cost, bench.gpu)
    pred = {"compute_s": parts.compute_s, "launch_s": parts.launch_s,
            "async_copy_s": parts.async_copy_s, "blocking_s": parts.blocking_s,
            "predicted_s": parts.predicted_s}
    out = {**run, "cost": cost.to_dict(), "cost_source": source, "predicted": pred}
    seconds = run.get("time_s")
    ok = bool(seconds) and parts.predicted_s > 0
    tflops = cost.flops / seconds / 1e12 if seconds else None
    out.update(measured_over_predicted=seconds / parts.predicted_s if ok else None,
               achieved_tflops=tflops,
               share_of_dense=tflops / bench.gpu.dense_tflops if tflops is not None else None)
    return out


def unet_prediction(bench: Bench, config: dict, px: tuple[int, int], knobs, run: dict) -> dict:
    """A UNet run with the planner's ledger count (UnetLedger, batch 2) beside it."""
    cost = bench.unet_ledger(config)(px[0], px[1], knobs, 2)
    return with_prediction(bench, run, cost, "UnetLedger")


def unet_forward(unet, plan, px: tuple[int, int], memory_format=None):
    """(call, undo): one guided UNet forward at px under plan's knobs (apply_knobs), its input
    sample in `memory_format` (None: contiguous)."""
    from linfusion_cli.pipeline.knobs import apply_knobs

    sample, t, kwargs = unet_inputs(unet, *px)
    if memory_format is not None:
        sample = sample.contiguous(memory_format=memory_format)
    undo = apply_knobs(unet, None, plan)
    return (lambda: unet(sample, t, return_dict=False, **kwargs)[0]), undo


def time_unet(bench: Bench, unet, plan, px, repeats: int) -> tuple[dict, object]:
    """Measure one guided forward under plan's knobs; the knobs come off again after."""
    call, undo = unet_forward(unet, plan, px)
    try:
        return timed(bench, call, repeats)
    finally:
        undo()


def default_chunk(bench: Bench) -> int:
    """The LinFusion chunk the planner's loosest plan sets on this device."""
    from linfusion_cli import figures

    return figures.LINFUSION_DEFAULT_CHUNK[bench.sizes.device]


# ---------------------------------------------------------------- preflight

def preflight(bench: Bench) -> None:
    """Versions, the device, its memory and the host<->device copy rates, each saved as found."""
    import torch

    info = bench.record.data["preflight"]
    info.update(python=platform.python_version(), torch=torch.__version__,
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if bench.cuda else None,
                diffusers=_version("diffusers"), cpu_count=os.cpu_count(), device=None,
                capability=None, multiprocessors=None, total_bytes=None, free_bytes=None,
                outside_torch_bytes=None, copy=None)
    bench.record.flush()
    if not bench.cuda:
        return
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    info.update(device=torch.cuda.get_device_name(), capability=f"{props.major}.{props.minor}",
                multiprocessors=props.multi_processor_count, total_bytes=total, free_bytes=free,
                outside_torch_bytes=outside_torch())
    bench.record.flush()
    log(f"device {info['device']} sm_{props.major}{props.minor}, {total / GIB:.1f} GiB "
        f"({free / GIB:.1f} free), torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"cuDNN {info['cudnn']}")
    info["copy"] = {"bytes": COPY_BYTES, "repeats": COPY_REPEATS,
                    "model_pinned_gbps": bench.gpu.pinned_bps / 1e9,
                    "model_pageable_gbps": bench.gpu.pageable_bps / 1e9}
    for kind in ("pinned", "pageable"):
        info["copy"][kind] = copy_rates(kind == "pinned")
        bench.record.flush()
        log(f"  copy {kind}: h2d {info['copy'][kind]['h2d_gbps']:.1f} GB/s, "
            f"d2h {info['copy'][kind]['d2h_gbps']:.1f} GB/s")


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 (a missing distribution is only a missing field)
        return None


def copy_rates(pinned: bool) -> dict:
    """Best-of-repeats GB/s of a COPY_BYTES copy each way, timed with CUDA events."""
    import torch

    device = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    host = torch.ones(COPY_BYTES, dtype=torch.uint8, pin_memory=pinned)  # pages touched
    rates = {}
    for name, copy in (("h2d", lambda: device.copy_(host, non_blocking=pinned)),
                       ("d2h", lambda: host.copy_(device, non_blocking=pinned))):
        copy()  # warm-up
        best = float("inf")
        for _ in range(COPY_REPEATS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            copy()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        rates[f"{name}_gbps"] = COPY_BYTES / best / 1e9
    return rates


# ---------------------------------------------------------------- the cases

def case_unet_bands(bench: Bench, rec: dict) -> None:
    """Band-wise vs whole UNet forward: their speed and how far their fp16 outputs drift apart."""
    s = bench.sizes
    px = (s.step_px, s.step_px)
    plans = {"whole": MemoryPlan(attn_chunk=default_chunk(bench)),
             "bands": MemoryPlan(attn_chunk=default_chunk(bench), band_rows=s.band_rows)}
    rec["setup"] = {"width": px[0], "height": px[1], "batch": 2, "dtype": s.unet_dtype,
                    "knobs": {k: p.knobs().__dict__ for k, p in plans.items()}}
    if bench.dry:
        rec["runs"] = {k: unet_prediction(bench, s.sd15, px, p, {}) for k, p in plans.items()}
        return
    unet, runs, outs = bench.model("sd15"), {}, {}
    for name, plan in plans.items():
        runs[name], outs[name] = time_unet(bench, unet, plan, px, s.repeats)
        log(f"  {name}: {runs[name]['time_s']:.3f} s")
    diff = (outs["whole"].float() - outs["bands"].float()).abs().max().item()
    rec.update(runs=runs, max_abs_diff=diff, max_abs_output=outs["whole"].float().abs().max().item())
    del outs
    bench.record.flush()
    rec["runs"] = {k: unet_prediction(bench, s.sd15, px, plans[k], r) for k, r in runs.items()}


def plan_16k(bench: Bench) -> MemoryPlan:
    """The plan the CLI would choose for the 16K stage within --budget-gib: the fitting frontier
    priced by the ledger (planning.cost.stage_cost over the recipe's 5 guided steps), fastest
    wins. Only the UNet phase is priced: the VAE phases' meta count at 16K takes minutes of CPU
    per tile size, and the frontier's plans share their tile here."""
    if bench.plan_16k is None:
        from linfusion_cli.planning.cost import ZERO, stage_cost

        s = bench.sizes
        unet = bench.unet_ledger(s.sd15)

        def ledger(phase, w, h, plan, guidance):
            return unet(w, h, plan, 2 if guidance else 1) if phase == "unet" else ZERO

        stage = SimpleNamespace(width=s.big[0], height=s.big[1], guidance=GUIDANCE, strength=0.1,
                                denoise_steps=RECIPE_DENOISE_STEPS, method="img2img")
        weights = est.weight_bytes(s.sd15, s.vae, s.dtype_bytes, vae_bytes=s.vae_bytes)
        log(f"  choosing the {s.big[0]}x{s.big[1]} plan (UNet phase priced by the ledger) ...")
        bench.plan_16k = choose_knobs(
            s.sd15, s.vae, width=s.big[0], height=s.big[1], dtype_bytes=s.dtype_bytes,
            vae_bytes=s.vae_bytes, budget_bytes=int(s.budget_gib * GIB), device=s.device,
            fixed=s.fixed, price=lambda m: stage_cost(ledger, bench.gpu, stage, m, weights).seconds())
    return bench.plan_16k


def case_unet_16k(bench: Bench, rec: dict) -> None:
    """The 16384x8192 step on the budget's plan under an allocator cap: peaks vs the estimate."""
    import torch

    s = bench.sizes
    plan = plan_16k(bench)
    breakdown = est.peak_breakdown(s.sd15, s.vae, width=s.big[0], height=s.big[1],
                                   dtype_bytes=s.dtype_bytes, batch=2, knobs=plan.knobs(),
                                   device=s.device, text_encoders_bytes=0, vae_bytes=s.vae_bytes)
    rec["setup"] = {"width": s.big[0], "height": s.big[1], "batch": 2, "dtype": s.unet_dtype,
                    "budget_gib": s.budget_gib, "plan": plan.to_dict(), "knobs": knob_text(plan),
                    "estimate": {k: v for k, v in breakdown.items() if k != "unet_terms"},
                    "cap_fraction": None}
    log(f"  plan: {knob_text(plan)} (estimated {plan.estimated_peak_gib} GiB with text encoders; "
        f"without, as loaded here:)\n{est.format_breakdown(breakdown)}")
    if bench.dry:
        rec["runs"] = {"step": unet_prediction(bench, s.sd15, s.big, plan, {})}
        return
    if plan.offload == "sequential":
        raise NotImplementedError("sequential offload needs a pipeline (accelerate hooks)")
    unet, vae = bench.model("sd15"), bench.model("vae")
    if plan.offload == "model":  # only the running model on the device, as accelerate would
        vae.to("cpu")
    budget = int(s.budget_gib * GIB)
    if bench.cuda:
        clean(bench)
        fraction = (budget - outside_torch()) / torch.cuda.mem_get_info()[1]
        rec["setup"]["cap_fraction"] = fraction
        torch.cuda.set_per_process_memory_fraction(max(0.01, min(1.0, fraction)))
    bench.record.flush()
    try:
        run, _ = time_unet(bench, unet, plan, s.big, s.repeats_big)
    except oom_errors():
        rec["at_oom"] = peaks(bench)  # how far it got under the cap
        raise
    finally:
        if bench.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
        vae.to(s.device)
    log(f"  step: {run['time_s']:.2f} s")
    rec["runs"] = {"step": run}
    rec.update(check_16k(bench, run, budget, breakdown))
    bench.record.flush()
    rec["runs"] = {"step": unet_prediction(bench, s.sd15, s.big, plan, run)}


def check_16k(bench: Bench, run: dict, budget: int, breakdown: dict) -> dict:
    """The measured peaks against the budget and the planner's estimate (CUDA only)."""
    if not bench.cuda:
        return {"check": None, "versus_estimate": None}
    device = run["max_reserved_bytes"] + run["outside_torch_bytes"]
    unet_est = breakdown["unet_weights"] + breakdown["unet_activations"]
    return {"check": {"budget_bytes": budget, "measured_device_bytes": device,
                      "fits": device <= budget},
            "versus_estimate": {"estimated_total_bytes": breakdown["total"],
                                "measured_over_estimated": device / breakdown["total"],
                                "estimated_unet_bytes": unet_est,
                                "max_allocated_bytes": run["max_allocated_bytes"],
                                "allocated_over_estimated": run["max_allocated_bytes"] / unet_est}}


def vae_kwargs(bench: Bench, fn, plan: MemoryPlan) -> dict:
    """The tiled VAE's memory arguments as a run passes them (pipeline/context.vae_plan): the
    plan's band_rows, exact statistics, and device_budget where decode/encode take one."""
    kwargs = {"band_rows": plan.band_rows, "mode": "exact"}
    if "device_budget" in inspect.signature(fn).parameters and bench.sizes.device == "cuda":
        from linfusion_cli.planning.budget import vae_device_budget

        kwargs["device_budget"] = vae_device_budget(int(bench.sizes.budget_gib * GIB),
                                                    plan.estimated_peak_gib)
    return kwargs


def vae_ledger(bench: Bench):
    """tracing.ledger.VaeLedger for the VAE config, with the disk cache and the budget where it
    takes them (it is newer than this script)."""
    from linfusion_cli.tracing.ledger import VaeLedger

    offered = {"cache": bench.ledger_cache, "budget_bytes": int(bench.sizes.budget_gib * GIB)}
    takes = inspect.signature(VaeLedger).parameters
    return VaeLedger(bench.sizes.vae, dtype=dtype_of(bench.sizes.vae_dtype),
                     **{k: v for k, v in offered.items() if k in takes})


def tile_px(bench: Bench, plan: MemoryPlan) -> int:
    """The plan's VAE tile; an untiled plan's stand-in is the largest tile the planner offers."""
    return plan.vae_tile_px or min(max(bench.sizes.big) // 2, 4096)


def case_vae_tile(bench: Bench, rec: dict, decoder: bool) -> None:
    """One tile of the 16K plan's size through the tiled decode or encode (its per-tile time and
    memory: the whole pass is about tiles_at_full_size of them)."""
    import numpy as np
    import torch

    from linfusion_cli import vae as tiled

    s = bench.sizes
    plan = plan_16k(bench)
    tile = tile_px(bench, plan)
    fn = tiled.decode if decoder else tiled.encode
    context = tiled.DECODER_CONTEXT if decoder else tiled.ENCODER_CONTEXT
    kwargs = vae_kwargs(bench, fn, plan)
    full = len(tiled.tile_grid(s.big[1] // 8, s.big[0] // 8, tile // 8, context))
    rec["setup"] = {"tile_px": tile, "dtype": s.vae_dtype, "plan": knob_text(plan),
                    "kwargs": kwargs}
    rec["tiles_at_full_size"] = full
    counted_plan = replace(plan, vae_tile_px=tile, vae_decode_mode="exact", vae_encode_mode="exact")
    ledger_cost = vae_ledger(bench)(tile, tile, counted_plan, decoder=decoder)
    has_counts = any(ledger_cost.to_dict().values())
    if bench.dry:
        rec["runs"] = {"tile": with_prediction(bench, {}, ledger_cost if has_counts else None,
                                               "VaeLedger" if has_counts else "counted in the run")}
        return
    vae, reports = bench.model("vae"), []
    if decoder:
        g = torch.Generator(s.device).manual_seed(3)
        data = torch.randn(1, 4, tile // 8, tile // 8, generator=g, device=s.device)
    else:
        data = np.random.default_rng(3).integers(0, 256, (tile, tile, 3), dtype=np.uint8)
    call = lambda: fn(vae, data, tile_px=tile, on_report=reports.append, **kwargs)  # noqa: E731
    run, _ = timed(bench, call, s.repeats)
    log(f"  {'decode' if decoder else 'encode'} tile {tile} px: {run['time_s']:.3f} s")
    rec.update(runs={"tile": run}, report=reports[-1].to_dict())
    bench.record.flush()
    cost, source = (ledger_cost, "VaeLedger") if has_counts else (counted(call), "counted")
    rec["runs"] = {"tile": with_prediction(bench, run, cost, source)}


def case_vae_attention(bench: Bench, rec: dict) -> None:
    """The VAE mid-block's exact global attention over attn_side^2 tokens (vae/attention.py)."""
    import torch

    from linfusion_cli.vae.attention import fused_sdpa, mid_attention

    s = bench.sizes
    side, tokens = s.attn_side, s.attn_side ** 2
    rec["setup"] = {"tokens": tokens, "side": side, "dtype": s.vae_dtype,
                    "channels": s.vae["block_out_channels"][-1]}

    def cost():
        """The same attention counted on the meta device (no GPU time), as CUDA runs it: one
        SDPA call over every query (a meta tensor would take the CPU's query chunks, 16K calls)."""
        from unittest import mock

        from diffusers import AutoencoderKL

        from linfusion_cli.vae import attention

        with torch.device("meta"):
            vae = AutoencoderKL.from_config(s.vae).to(dtype_of(s.vae_dtype))
            x = torch.empty(1, s.vae["block_out_channels"][-1], side, side,
                            dtype=dtype_of(s.vae_dtype))
        attn = vae.decoder.mid_block.attentions[0]
        with mock.patch.dict(attention.VAE_ATTN_SCORE_BYTES, {"cpu": 1 << 62}):
            return counted(lambda: mid_attention(attn, x, token_limit=tokens))
    if bench.dry:
        rec["runs"] = {"attention": with_prediction(bench, {}, cost(), "counted (meta)")}
        return
    attn = bench.model("vae").decoder.mid_block.attentions[0]
    g = torch.Generator(s.device).manual_seed(4)
    x = torch.randn(1, s.vae["block_out_channels"][-1], side, side, generator=g, device=s.device,
                    dtype=dtype_of(s.vae_dtype))
    probe = x.new_empty(1, 1, 64, x.shape[1])  # SDPA's kernel choice does not depend on N
    rec["fused_sdpa"] = fused_sdpa(probe, probe, probe)  # False: query chunks of bounded scores
    run, out = timed(bench, lambda: mid_attention(attn, x, token_limit=tokens), s.repeats_big)
    rec.update(runs={"attention": run}, exact=bool(out[1]))
    del out, x
    log(f"  {tokens} tokens: {run['time_s']:.3f} s")
    bench.record.flush()
    rec["runs"] = {"attention": with_prediction(bench, run, cost(), "counted (meta)")}


LAYOUTS = {"default": (False, False), "channels_last": (True, False),
           "cudnn_benchmark": (False, True), "channels_last+cudnn_benchmark": (True, True)}


def case_unet_layout(bench: Bench, rec: dict) -> None:
    """channels_last and cudnn.benchmark, each on and off, for the whole SD1.5 forward."""
    import torch

    s = bench.sizes
    px, plan = (s.step_px, s.step_px), MemoryPlan(attn_chunk=default_chunk(bench))
    rec["setup"] = {"width": px[0], "height": px[1], "batch": 2, "dtype": s.unet_dtype,
                    "knobs": knob_text(plan), "variants": list(LAYOUTS)}
    if bench.dry:
        rec["runs"] = {k: unet_prediction(bench, s.sd15, px, plan, {}) for k in LAYOUTS}
        return
    unet, runs = bench.model("sd15"), {}
    saved = torch.backends.cudnn.benchmark
    try:
        for name, (last, autotune) in LAYOUTS.items():
            fmt = torch.channels_last if last else torch.contiguous_format
            unet.to(memory_format=fmt)
            torch.backends.cudnn.benchmark = autotune
            call, undo = unet_forward(unet, plan, px, fmt)
            try:
                runs[name], _ = timed(bench, call, s.repeats)
            finally:
                undo()
            log(f"  {name}: {runs[name]['time_s']:.3f} s")
            rec["runs"] = dict(runs)
            bench.record.flush()
    finally:
        torch.backends.cudnn.benchmark = saved
        unet.to(memory_format=torch.contiguous_format)
    rec["runs"] = {k: unet_prediction(bench, s.sd15, px, plan, r) for k, r in runs.items()}


def case_sdxl_dilated(bench: Bench, rec: dict) -> None:
    """SD-XL's plain forward vs DemoFusion's dilated pass (pipeline/demofusion.dilated_convs)."""
    import torch

    from linfusion_cli.pipeline.demofusion import dilated_convs, dilation_scale

    s = bench.sizes
    px = (s.sdxl_px, s.sdxl_px)
    scale = dilation_scale(px[0], px[1], s.sdxl_trained_px)
    plan = MemoryPlan(attn_chunk=default_chunk(bench))
    rec["setup"] = {"width": px[0], "height": px[1], "batch": 2, "dtype": s.unet_dtype,
                    "knobs": knob_text(plan)}
    rec["dilation"] = scale
    if bench.dry:
        rec["runs"] = {k: unet_prediction(bench, s.sdxl, px, plan, {}) for k in ("plain", "dilated")}
        return
    for name in ("sd15", "vae"):  # room for SD-XL's 5 GiB of weights and its activations
        bench.models.pop(name, None)
    clean(bench)
    log("  building sdxl ...")
    unet, runs = build_unet(s.sdxl, s), {}
    try:
        call, undo = unet_forward(unet, plan, px)
        try:
            runs["plain"], _ = timed(bench, call, s.repeats)
            log(f"  plain: {runs['plain']['time_s']:.3f} s")
            rec["runs"] = dict(runs)
            bench.record.flush()
            with dilated_convs(unet, scale):
                runs["dilated"], _ = timed(bench, call, s.repeats)
            log(f"  dilated x{scale}: {runs['dilated']['time_s']:.3f} s")
        finally:
            undo()
    finally:
        del unet
        clean(bench)
    rec["runs"] = dict(runs)
    bench.record.flush()
    rec["runs"] = {k: unet_prediction(bench, s.sdxl, px, plan, r) for k, r in runs.items()}


CASES = [
    ("unet_bands", "SD1.5 UNet forward, whole vs band-wise: time and fp16 difference",
     case_unet_bands),
    ("unet_16k", "SD1.5 16384x8192 forward on the budget's plan, allocator capped: peaks vs estimate",
     case_unet_16k),
    ("vae_decode_tile", "one tiled-VAE decode tile of the 16K plan's size",
     lambda b, r: case_vae_tile(b, r, decoder=True)),
    ("vae_encode_tile", "one tiled-VAE encode tile of the 16K plan's size",
     lambda b, r: case_vae_tile(b, r, decoder=False)),
    ("vae_attention", "VAE mid-block global attention over 1M tokens (tiny: side^2)",
     case_vae_attention),
    ("unet_layout", "SD1.5 UNet forward: channels_last and cudnn.benchmark on/off",
     case_unet_layout),
    ("sdxl_dilated", "SD-XL forward, plain vs DemoFusion's dilated pass", case_sdxl_dilated),
]


# ---------------------------------------------------------------- running

def oom_errors() -> tuple:
    import torch

    return (torch.cuda.OutOfMemoryError, MemoryError)


def run_case(bench: Bench, name: str, what: str, fn) -> None:
    """One case under its own try/except, its record saved when it starts and when it ends."""
    cases = bench.record.data["cases"]
    rec = cases[name] = {"status": "running", "what": what}
    if not bench.dry and bench.left_s() < GUARD_S:
        rec.update(status="skipped", note=f"{bench.left_s():.0f} s left of the "
                   f"{bench.budget_s:.0f} s budget (guard {GUARD_S:.0f} s)")
        bench.record.flush()
        log(f"{name}: skipped (time)")
        return
    bench.record.flush()
    log(f"{name}: {what}")
    start = time.monotonic()
    try:
        fn(bench, rec)
        rec["status"] = "ok"
    except oom_errors() as err:
        rec.update(status="oom", error=str(err).splitlines()[0][:300])
        log(f"  out of memory: {rec['error']}")
    except Exception as err:  # noqa: BLE001 (one case's failure must not stop the others)
        rec.update(status="error", error=f"{type(err).__name__}: {err}"[:500],
                   traceback=traceback.format_exc()[-3000:])
        log(f"  error: {rec['error']}")
    finally:
        rec["wall_s"] = time.monotonic() - start
        clean(bench)
        bench.save()


def choose_gpu(bench: Bench):
    """The gpus.GPUS entry of the device found (detected_gpu), or the H100 off CUDA."""
    from linfusion_cli import gpus

    if bench.cuda:
        import torch

        return gpus.detected_gpu(torch.cuda.get_device_name(), torch.cuda.mem_get_info()[1] / GIB)
    return gpus.GPUS["h100"]  # off CUDA: priced for the GPU the check is written for


def summary(data: dict) -> str:
    """The table printed at the end: one row per case and variant."""
    head = (f"{'case':16s} {'variant':30s} {'status':8s} {'time s':>9s} {'pred s':>9s} "
            f"{'meas/pred':>9s} {'TFLOP/s':>8s} {'alloc GiB':>9s}")
    rows = [head, "-" * len(head)]
    num = lambda x, f: format(x, f) if x is not None else "-".rjust(int(f.split(".")[0]))  # noqa: E731
    for name, rec in data["cases"].items():
        runs = rec.get("runs") or {"": {}}
        for variant, r in runs.items():
            pred = (r.get("predicted") or {}).get("predicted_s")
            alloc = r.get("max_allocated_bytes")
            rows.append(f"{name:16s} {variant:30s} {rec['status']:8s} "
                        f"{num(r.get('time_s'), '9.4f')} {num(pred, '9.4f')} "
                        f"{num(r.get('measured_over_predicted'), '9.2f')} "
                        f"{num(r.get('achieved_tflops'), '8.2f')} "
                        f"{num(None if alloc is None else alloc / GIB, '9.2f')}")
    extra = data["cases"].get("unet_16k", {})
    if extra.get("check"):
        c, v = extra["check"], extra["versus_estimate"]
        rows.append(f"unet_16k: device peak {c['measured_device_bytes'] / GIB:.2f} GiB of "
                    f"{c['budget_bytes'] / GIB:.0f} ({'fits' if c['fits'] else 'OVER'}); "
                    f"measured/estimated {v['measured_over_estimated']:.2f}, allocated/estimated "
                    f"{v['allocated_over_estimated']:.2f}")
    bands = data["cases"].get("unet_bands", {})
    if "max_abs_diff" in bands:
        rows.append(f"unet_bands: max |whole - bands| {bands['max_abs_diff']:.3g} "
                    f"(outputs up to {bands['max_abs_output']:.3g})")
    return "\n".join(rows)


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry", action="store_true", help="plans, estimates, predictions; no runs")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU, every case")
    ap.add_argument("--json", type=Path, help="write the results here (rewritten as they come)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S,
                    help=f"seconds for the whole run; no case starts with < {GUARD_S:.0f} s left")
    ap.add_argument("--budget-gib", type=float, default=24.0,
                    help="the device budget the 16K plan is chosen for and capped at")
    ap.add_argument("--ledger-cache", type=Path, default=None,
                    help="folder for the ledger's counts (default: the CLI's; none for --cpu-smoke)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.cpu_smoke:
        sizes = smoke_sizes()
    else:
        sizes = gpu_sizes(args.budget_gib)
        if not args.dry:
            import torch

            if not torch.cuda.is_available():
                print("gpu_16k: no CUDA device here; nothing measured (try --dry or --cpu-smoke)")
                return 0
    cache = args.ledger_cache
    if cache is None and not args.cpu_smoke:
        from linfusion_cli.models.loading import cache_dir

        cache = cache_dir() / "ledger"
    mode = "dry" if args.dry else "cpu-smoke" if args.cpu_smoke else "gpu"
    data = {"script": "benchmarks/gpu_16k.py", "mode": mode, "argv": sys.argv[1:] if argv is None
            else list(argv), "budget_s": args.budget_s, "elapsed_s": 0.0, "done": False,
            "gpu_model": None, "preflight": {}, "cases": {}}
    bench = Bench(sizes, Record(args.json, data), args.dry, args.budget_s, cache)
    bench.gpu = choose_gpu(bench)
    data["gpu_model"] = {**bench.gpu.to_dict(), "dense_tflops": bench.gpu.dense_tflops}
    log(f"gpu_16k: {mode} on {sizes.device}, predictions for {bench.gpu.name}, "
        f"budget {args.budget_s:.0f} s, ledger cache {cache}")
    preflight(bench)
    for name, what, fn in CASES:
        run_case(bench, name, what, fn)
    data["done"] = True
    bench.save()
    print(summary(data))
    check = data["cases"]["unet_16k"]
    failed = check["status"] == "oom" or (check.get("check") or {}).get("fits") is False
    return 1 if failed else 0


if __name__ == "__main__":
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # not "modules that should be kept in float32" x5
    sys.exit(main())
