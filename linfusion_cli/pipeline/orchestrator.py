"""Run a plan: the base image (or an input image), then every img2img stage, in order."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from .. import __version__, parallel
from ..errors import NonFiniteError, OutOfMemoryError
from . import finite
from ..planning.plan import GenerationPlan, Stage
from .events import EventHandler, StageFinished, StageStarted, Retrying, ignore
from .memory import memory_plan_applied
from .preview import Previewer
from .stages import StageContext, stage_function
from ..models.loading import TORCH_DTYPES
from ..runtime import transfer
from ..io import weights_id


def dtype_name(dtype) -> str:
    """fp32 / fp16 / bf16: the names the flags, presets and the dry run use."""
    return next((name for name, value in TORCH_DTYPES.items() if value == dtype), str(dtype).replace("torch.", ""))


def run_record(plan: GenerationPlan, model, stages: list[dict]) -> dict:
    """The machine-readable record of a run (metadata chunk, --json, --resume)."""
    base = plan.stages[0]
    group = parallel.active()
    return {
        "prompt": plan.prompt, "negative": plan.negative, "seed": plan.seed,
        "steps": base.steps, "sampler": model.sampler, "guidance": base.guidance,
        "width": plan.width, "height": plan.height, "model": plan.model, "family": model.family,
        "linfusion": model.linfusion, "dtype": dtype_name(model.dtype),
        "vae_dtype": dtype_name(getattr(model, "vae_dtype", model.dtype)),
        "device": str(model.device), "init_image": plan.init_image,
        "budget": plan.budget.to_dict() if plan.budget is not None else None, "stages": stages,
        "adapters": (getattr(model, "adapters", None) or plan.adapters).to_dict(),  # what was mounted
        "weights": weights_id.identity(plan),  # which files: resume and batch --resume compare them
        "version": f"linfusion-cli {__version__}",
        **({"parallel": {"mode": "bands", "world_size": group.size}} if group is not None else {}),
    }


def _peak_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return None


def _vae_notes(notes: dict) -> dict:
    """The VAE's own reports (vae.TileReport: mode, tiles, attention), JSON-safe, for the run record."""
    return {part: report.to_dict() for part, report in notes.items()}


def _run_stage(ctx: StageContext, stage: Stage,
               previous: np.ndarray | None) -> tuple[np.ndarray, Stage, dict]:
    """One stage under its memory plan; on CUDA out-of-memory, once more with a tighter plan; on
    NaN/inf from the UNet or VAE, once more with that part in float32.

    Returns the image, the stage as it ran (its memory plan may be the tighter one) and the
    knobs read back from the modules while it ran.
    """
    device = ctx.model.device
    widened, tightened = set(), False  # parts moved to float32; memory plan tightened once
    while True:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with torch.inference_mode(), memory_plan_applied(ctx.model, stage.memory) as knobs:
                return stage_function(stage)(ctx, stage, previous), stage, knobs
        except NonFiniteError as exc:  # fp16 overflow: once more with that part in float32
            if exc.part in widened or not finite.widen(ctx.model, exc.part):
                raise NonFiniteError(exc.part, f"stage {stage.index + 1} ({stage.width}x{stage.height}): "
                                     f"the {exc.part.upper()} produced NaN/inf values even in float32") from None
            widened.add(exc.part)
            ctx.on_event(Retrying(stage.index, f"NaN/inf from the {exc.part.upper()}; retrying it in float32"))
            continue
        except torch.OutOfMemoryError as exc:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            tighter = stage.memory.tighter(device.type) if not tightened and stage.memory else None
            if tighter is None:
                raise OutOfMemoryError(
                    f"stage {stage.index + 1} ({stage.width}x{stage.height}) ran out of device "
                    "memory even with the tightest plan; lower --max-vram or --vae-tile") from exc
            knobs = ", ".join(f"{k}={v}" for k, v in tighter.to_dict().items() if k != "estimated_peak_gib")
            ctx.on_event(Retrying(stage.index, f"out of memory; retrying with {knobs}"))
            stage, tightened = replace(stage, memory=tighter), True


def _count(moved: dict, direction: str, n: int, blocking: bool) -> None:
    """Add one copy through runtime/transfer.py to a stage's measured PCIe bytes."""
    moved[f"{direction}_bytes"] += n
    if blocking:
        moved["blocking_bytes"] += n


def run_plan(plan: GenerationPlan, model, *, on_event: EventHandler = ignore,
             init_image: np.ndarray | None = None, resume_from=None,
             previews: bool = True) -> tuple[np.ndarray, dict]:
    """Every stage in order; returns the final uint8 (H, W, 3) image and the run record.

    Each finished stage is reported (with its image) through a StageFinished event, so the
    caller can keep it before the next stage starts. `resume_from` (io.checkpoints.Start): go on
    after its stage from its image, exactly the uint8 image that stage handed on.
    previews: write plan.preview's file (False: a band-parallel rank other than 0).
    """
    preview = None
    if previews and plan.preview is not None:
        preview = Previewer(plan.preview, family=plan.family, on_event=on_event,
                            decoder=getattr(model, "preview_decoder", None))
    ctx = StageContext(plan=plan, model=model, on_event=on_event, preview=preview)
    image = init_image if resume_from is None else resume_from.image
    done: list[dict] = [] if resume_from is None else resume_from.stage_records
    for stage in plan.stages[0 if resume_from is None else resume_from.stage + 1:]:
        on_event(StageStarted(stage.index, len(plan.stages), stage.width, stage.height, stage.denoise_steps))
        moved = {"h2d_bytes": 0, "d2h_bytes": 0, "blocking_bytes": 0}  # counted by transfer.py
        start = time.perf_counter()
        with transfer.observed(lambda direction, n, blocking: _count(moved, direction, n, blocking)):
            image, ran, knobs = _run_stage(ctx, stage, image)
        seconds = time.perf_counter() - start
        if preview is not None:
            preview.finished(stage, image)
        vae = _vae_notes(ctx.notes.get(stage.index, {}))
        knobs["vae_tile_px"] = vae.get("decode", {}).get("tile_px", 0)
        stage_record = ran.to_dict() | {"seconds": round(seconds, 3), "peak_gib": _peak_gib(model.device),
                                        "vae": vae, "memory_in_effect": knobs, "pcie_moved": moved}
        done.append(stage_record)
        on_event(StageFinished(stage.index, len(plan.stages), seconds, stage_record["peak_gib"], image,
                               run_record(plan, model, done)))
    record = run_record(plan, model, done)
    if resume_from is not None:
        record["resumed"] = {"after_stage": resume_from.stage + 1}
    return image, record
