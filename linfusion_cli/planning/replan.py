"""A stage planned again while it runs: lower after it ran out of memory, or for four-byte values
after a NaN/inf retry widened a part; the other part's knobs held where they were."""

from __future__ import annotations

from dataclasses import replace

from .. import figures
from ..models.resolve import DTYPE_BYTES
from .budget import GIB
from .memory.planner import BudgetError, MemoryPlan, choose_knobs
from .plan import GenerationPlan, Stage
from .memory.fit import held_bytes, host_need, knob_args, vae_modes
from .memory.knob_table import part_knobs

SHARE = 0.75  # a re-plan after out of memory aims this far below what ran out
# the knobs that shape each part's peak (offload and in-place SiLU serve both)
UNET_KNOBS = part_knobs("unet")
VAE_KNOBS = part_knobs("vae")


def lower_budget(stage: Stage, reserved_peak_gib: float | None) -> int | None:
    """Bytes a re-plan after out of memory is made for: SHARE of the failed plan's estimate, or of
    the reserved peak measured on CUDA when that is lower (None: no estimate to go below)."""
    figures = [g for g in (stage.memory.estimated_peak_gib if stage.memory else 0, reserved_peak_gib)
               if g]
    return int(min(figures) * GIB * SHARE) if figures else None


def planned_budget(plan: GenerationPlan, stage: Stage, dtype: str | None = None) -> int | None:
    """Bytes the stage's plan was chosen for (the budget less what the stage holds beside it)."""
    if plan.model_info is None or plan.budget is None or plan.budget.bytes is None:
        return None
    kind = figures.device_kind(plan.device)
    return plan.budget.bytes - held_bytes(plan, stage, kind, DTYPE_BYTES[dtype or plan.dtype])


def replan(plan: GenerationPlan, stage: Stage, part: str, budget_bytes: int | None, *,
           dtype: str | None = None, vae_dtype: str | None = None) -> MemoryPlan | None:
    """The fastest plan for `stage` whose estimate fits budget_bytes, only the knobs of `part`
    ("unet" or "vae") free to change (it may be the plan as it was); None where the plan has no
    model configs (a library caller's plan), no budget, or no such plan fits (the caller then
    walks MemoryPlan.tighter).
    dtype / vae_dtype: the parts' dtypes now, when a NaN/inf retry widened one."""
    if plan.model_info is None or stage.memory is None or not budget_bytes or budget_bytes <= 0:
        return None
    kind = figures.device_kind(plan.device)
    held = VAE_KNOBS if part == "unet" else UNET_KNOBS
    fixed = {name: getattr(stage.memory, name) for name in held}
    widened = replace(plan, dtype=dtype or plan.dtype, vae_dtype=vae_dtype or plan.vae_dtype)
    try:
        memory = choose_knobs(**knob_args(widened, stage, kind, DTYPE_BYTES[widened.dtype],
                                           DTYPE_BYTES[widened.vae_dtype], fixed),
                              budget_bytes=budget_bytes)
    except BudgetError:
        return None
    cpu_budget = plan.budget.bytes if kind == "cpu" and plan.budget is not None else None
    host = host_need(widened, widened.model_info, stage, memory)
    return replace(memory, estimated_host_gib=round(host / GIB, 2),
                   **vae_modes(widened, stage, memory, cpu_budget))
