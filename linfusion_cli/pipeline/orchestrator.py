"""Run a plan: the base image (or an input image), then every img2img stage, in order."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from .. import __version__
from ..errors import NonFiniteError, OutOfMemoryError
from . import finite
from ..planning.plan import GenerationPlan, Stage
from .events import EventHandler, StageFinished, StageStarted, Retrying, ignore
from . import recovery
from ..planning import replan
from ..planning.budget import GIB
from .applied_memory import cap_allocator, device_memory, memory_plan_applied, reset_peaks
from .preview import Previewer
from .stages import StageContext, stage_function
from ..models.loading import TORCH_DTYPES
from ..runtime import transfer
from ..io import image_identity, weights_id


def dtype_name(dtype) -> str:
    """fp32 / fp16 / bf16: the names the flags, presets and the dry run use."""
    return next((name for name, value in TORCH_DTYPES.items() if value == dtype), str(dtype).replace("torch.", ""))


def run_record(plan: GenerationPlan, model, stages: list[dict], group=None) -> dict:
    """The machine-readable record of a run (metadata chunk, --json, --resume); group: the
    band-parallel group that made it (None: one process)."""
    base = plan.stages[0]
    return image_identity.recorded(plan, {  # and any other option that defines the image
        "prompt": plan.prompt, "negative": plan.negative, "seed": plan.seed,
        "steps": base.steps, "sampler": model.sampler, "guidance": base.guidance,
        "width": plan.width, "height": plan.height, "model": plan.model, "family": model.family,
        "linfusion": model.linfusion, "dtype": dtype_name(model.dtype),
        "vae_dtype": dtype_name(model.vae_dtype),
        "device": str(model.device), "init_image": plan.init_image,
        "budget": plan.budget.to_dict() if plan.budget is not None else None, "stages": stages,
        "adapters": (model.adapters or plan.adapters).to_dict(),  # what was mounted
        "weights": weights_id.identity(plan),  # which files: resume and batch --resume compare them
        "version": f"linfusion-cli {__version__}",
        **({"parallel": {"mode": "bands", "world_size": group.size}} if group is not None else {}),
    })


def _peak_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return None


def _vae_notes(notes: dict) -> dict:
    """The VAE's own reports (vae.TileReport: mode, tiles, attention), JSON-safe, for the run record."""
    return {part: report.to_dict() for part, report in notes.items()}


MAX_OOM_ATTEMPTS = 3  # runs of a stage that may end out of memory: the planned one, two re-plans
PHASE_WORDS = {"unet": "UNet", "vae_decode": "VAE decode", "vae_encode": "VAE encode"}


def _attempt(ctx: StageContext, stage: Stage, previous: np.ndarray | None):
    """One run of the stage under its memory plan: (status code, image or None, knobs read back).

    A failure is caught inside the plan's block, so its exception (whose traceback holds the
    stage's activations) is gone before memory is freed and before the plan's undo moves any
    model; under band parallelism every rank then agrees on one status (recovery.py).
    """
    phases, device = ctx.phases, ctx.model.device
    rank = phases.group.rank if phases.group is not None else 0
    image, agreed = None, False
    phases.current = "unet"  # the text encoders and the first forwards: the denoising part
    with torch.inference_mode(), memory_plan_applied(ctx.model, stage.memory, ctx.group) as applied:
        hook = phases.unet_hook(ctx.model.pipe.unet)
        try:
            image, code = stage_function(stage)(ctx, stage, previous, applied.unet), recovery.OK
        except recovery.Agreed as exc:  # a rank failed at a phase entry: every rank knows it
            code, agreed = exc.code, True
        except NonFiniteError as exc:
            code = recovery.code_of(f"nan:{exc.part}", rank)
        except Exception as exc:  # noqa: BLE001 - out of memory in any form; anything else goes on up
            if not recovery.is_oom(exc):
                raise
            code = recovery.code_of(f"oom:{phases.current}", rank)
        finally:
            hook.remove()
        if code != recovery.OK:
            recovery.release(device)  # the activations, before the undo moves models about
        if not agreed:
            code = phases.agree(code)  # the stage's end: every rank's status (alone: its own)
    if code != recovery.OK:
        image = None
        recovery.release(device)  # and what the undo took off the device
    return code, image, applied.read_back


def _oom_plan(ctx: StageContext, stage: Stage, phase: str, tries: int,
              reserved_peak_gib: float | None) -> tuple[Stage | None, dict]:
    """The stage re-planned after its tries-th out-of-memory in `phase`, and how: by the planner
    at a lower budget with only that phase's knobs free (planning/replan.py), else the next
    tighter plans aimed at that phase (two steps after the first, every step left after the
    second)."""
    if stage.memory is None or tries >= MAX_OOM_ATTEMPTS:
        return None, {}
    part = "unet" if phase == "unet" else "vae"
    budget = replan.lower_budget(stage, reserved_peak_gib)
    memory = replan.replan(ctx.plan, stage, part, budget, **_dtypes(ctx.model))
    if memory is not None and memory.knobs() != stage.memory.knobs():
        return replace(stage, memory=memory), {"planned_for_gib": round(budget / GIB, 2)}
    memory, steps = _ladder(ctx, stage, phase, 2 if tries == 1 else None)
    return (replace(stage, memory=memory) if steps else None), {"tighter_steps": steps}


def _dtypes(model) -> dict:
    """The parts' dtypes now (a NaN/inf retry may have widened one), as the planner names them."""
    return {"dtype": dtype_name(model.dtype),
            "vae_dtype": dtype_name(model.vae_dtype)}


def _ladder(ctx: StageContext, stage: Stage, phase: str, most: int | None):
    """(plan, steps): up to `most` steps (None: all) of MemoryPlan.tighter aimed at `phase`."""
    memory, steps = stage.memory, 0
    banded = ctx.phases.group is not None  # band parallelism: the UNet is always band-wise
    while (most is None or steps < most) and (tighter := memory.tighter(
            ctx.model.device.type, phase, max(stage.width, stage.height), banded)):
        memory, steps = tighter, steps + 1
    return memory, steps


def _wide_plan(ctx: StageContext, stage: Stage, part: str) -> tuple[Stage, str, dict]:
    """After `part` went to float32: the stage planned for its four-byte values at the stage's
    budget (the planner prices them), else two tighter steps for that part; (stage, words, how)."""
    budget = replan.planned_budget(ctx.plan, stage, dtype_name(ctx.model.dtype))
    memory = replan.replan(ctx.plan, stage, part, budget, **_dtypes(ctx.model))
    if memory is not None:
        how = {"memory": memory.to_dict(), "planned_for_gib": round(budget / GIB, 2)}
        return replace(stage, memory=memory), f" under a plan for 4-byte values ({_knob_text(memory)})", how
    memory, steps = _ladder(ctx, stage, "unet" if part == "unet" else "vae_decode", 2)
    if not steps:
        return stage, " (the plan has no tighter step left for it)", {}
    return (replace(stage, memory=memory), f" under a plan tightened for 4-byte values "
            f"({_knob_text(memory)})", {"memory": memory.to_dict(), "tighter_steps": steps})


def _smallest_budget(ctx: StageContext, attempts: list[dict]) -> str:
    """The smallest budget a failed stage was tried at: the plan's, a re-plan's, or the lowest
    reserved peak measured on CUDA."""
    figures = []
    if ctx.plan.budget is not None and ctx.plan.budget.gib:
        figures.append((ctx.plan.budget.gib, ctx.plan.budget.source))
    for attempt in attempts:
        if attempt.get("reserved_peak_gib") is not None:
            figures.append((attempt["reserved_peak_gib"], "reserved peak"))
        if attempt.get("retry", {}).get("planned_for_gib"):
            figures.append((attempt["retry"]["planned_for_gib"], "re-planned"))
    if not figures:
        return "no budget set"
    gib, what = min(figures)
    return f"{gib:.2f} GiB ({what})"


def _knob_text(memory) -> str:
    if memory is None:
        return "no memory plan"
    return ", ".join(f"{k}={v}" for k, v in memory.knobs().__dict__.items())


def _run_stage(ctx: StageContext, stage: Stage,
               previous: np.ndarray | None) -> tuple[np.ndarray, Stage, dict, list, dict | None]:
    """One stage under its memory plan; on out-of-memory, again with the plan re-planned tighter
    for the phase that failed (up to MAX_OOM_ATTEMPTS runs); on NaN/inf from the UNet or VAE,
    again with that part in bf16 where the device has it natively, else in float32 under a plan
    tightened for four-byte values.

    Returns the image, the stage as it ran (its memory plan may be a tighter one), the knobs
    read back from the modules while it ran, the failed attempts and the device's memory figures.
    """
    device = ctx.model.device
    attempts: list[dict] = []
    while True:
        reset_peaks(device)
        where = f"stage {stage.index + 1} ({stage.width}x{stage.height})"
        try:
            code, image, knobs = _attempt(ctx, stage, previous)
        except Exception as exc:  # noqa: BLE001 - out of memory putting the plan on or taking it off
            if not recovery.is_oom(exc):
                raise
            fatal = f"{where} ran out of device memory while its memory plan was put on or taken off"
        else:
            fatal = None
        # raised outside the except, its traceback gone; not retried: the undo runs after the
        # ranks' agreement, so a retry here would leave this rank a stage behind its peers
        if fatal is not None:
            raise OutOfMemoryError(fatal)
        measured = device_memory(device)
        if code == recovery.OK:
            return image, stage, knobs, attempts, measured
        failure = recovery.Failure.of(code, ctx.phases.group)
        attempts.append({"phase": failure.where, "reason": failure.reason(),
                         "memory": stage.memory.to_dict() if stage.memory is not None else None,
                         "reserved_peak_gib": measured["reserved_peak_gib"] if measured else None})
        if failure.kind == "nan":
            dtype = finite.retry_dtype(ctx.model, failure.where)
            if dtype is None:
                raise NonFiniteError(failure.where, f"{where}: the {failure.where.upper()} produced "
                                     "NaN/inf values even in float32")
            finite.widen(ctx.model, failure.where, dtype)
            note = f"retrying it in {'float32' if dtype == finite.WIDE else 'bf16'}"
            retry = {"dtype": dtype_name(dtype)}
            if dtype == finite.WIDE and stage.memory is not None:  # 4 bytes a value: re-planned
                stage, words, how = _wide_plan(ctx, stage, failure.where)
                note, retry = note + words, retry | how
            attempts[-1]["retry"] = retry
            ctx.on_event(Retrying(stage.index, f"{failure.reason()}; {note}"))
            continue
        tries = sum(a["reason"].startswith("out of memory") for a in attempts)
        retry, how = _oom_plan(ctx, stage, failure.where, tries, attempts[-1]["reserved_peak_gib"])
        if retry is None:
            raise OutOfMemoryError(
                f"{where} ran out of device memory in the {PHASE_WORDS[failure.where]} {tries} "
                f"time(s), the last with {_knob_text(stage.memory)}; smallest budget tried: "
                f"{_smallest_budget(ctx, attempts)}")
        stage = retry
        attempts[-1]["retry"] = {"memory": stage.memory.to_dict(), **how}
        ctx.on_event(Retrying(stage.index, f"{failure.reason()}; retrying with "
                              f"{_knob_text(stage.memory)}"))


def _count(moved: dict, direction: str, n: int, blocking: bool) -> None:
    """Add one copy through runtime/transfer.py to a stage's measured PCIe bytes."""
    moved[f"{direction}_bytes"] += n
    if blocking:
        moved["blocking_bytes"] += n


def run_plan(plan: GenerationPlan, model, *, on_event: EventHandler = ignore,
             init_image: np.ndarray | None = None, resume_from=None,
             previews: bool = True, faults=None, group=None) -> tuple[np.ndarray, dict]:
    """Every stage in order; returns the final uint8 (H, W, 3) image and the run record.

    Each finished stage is reported (with its image) through a StageFinished event, so the
    caller can keep it before the next stage starts. `resume_from` (io.checkpoints.Start): go on
    after its stage from its image, exactly the uint8 image that stage handed on.
    previews: write plan.preview's file (False: a band-parallel rank other than 0).
    faults: testhooks.OomFaults (LINFUSION_TEST_OOM), counted over every run the caller makes.
    group: the band-parallel group (parallel.BandGroup) every rank of which runs this plan with
    the same arguments; None: this process alone.
    """
    preview = None
    if previews and plan.preview is not None:
        preview = Previewer(plan.preview, family=plan.family, on_event=on_event,
                            decoder=model.preview_decoder)
    ctx = StageContext(plan=plan, model=model, on_event=on_event, preview=preview, group=group,
                       phases=recovery.Phases(faults, group))
    cap_allocator(model.device, plan.budget)  # --max-vram on CUDA: the allocator's limit
    image = init_image if resume_from is None else resume_from.image
    done: list[dict] = [] if resume_from is None else resume_from.stage_records
    for stage in plan.stages[0 if resume_from is None else resume_from.stage + 1:]:
        on_event(StageStarted(stage.index, len(plan.stages), stage.width, stage.height, stage.denoise_steps))
        moved = {"h2d_bytes": 0, "d2h_bytes": 0, "blocking_bytes": 0}  # counted by transfer.py
        start = time.perf_counter()
        with transfer.observed(lambda direction, n, blocking: _count(moved, direction, n, blocking)):
            image, ran, knobs, attempts, measured = _run_stage(ctx, stage, image)
        seconds = time.perf_counter() - start
        if preview is not None:
            preview.finished(stage, image)
        vae = _vae_notes(ctx.vae_reports.get(stage.index, {}))
        knobs["vae_tile_px"] = vae.get("decode", {}).get("tile_px", 0)
        stage_record = ran.to_dict() | {"seconds": round(seconds, 3), "peak_gib": _peak_gib(model.device),
                                        "vae": vae, "memory_in_effect": knobs, "pcie_moved": moved,
                                        "device_memory": measured, "attempts": attempts}
        done.append(stage_record)
        on_event(StageFinished(stage.index, len(plan.stages), seconds, stage_record["peak_gib"], image,
                               run_record(plan, model, done, group)))
    record = run_record(plan, model, done, group)
    if resume_from is not None:
        record["resumed"] = {"after_stage": resume_from.stage + 1}
    return image, record
