"""Every stage of a plan fitted into its budget: the memory plan of each, chosen by the planner
(memory/planner.py) from the estimate, the host RAM, the adapters' share and, on a known GPU,
the predicted seconds of the cost ledger; or one refusal naming the smallest budget that works.

The one entry is `add_memory_plans`; `smallest_budget` and the helpers below are what the
out-of-memory re-planning (planning/replan.py) shares with it.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ... import hostmem, figures
from ...adapters.specs import CONTROLNET_KINDS
from ...parallel.launch import processes_here
from ...errors import PlanError
from ...gpus import GPUS, detected_gpu
from ...hostmem import CPU_PLAN_SHARE_WORDS, cpu_plan_budget, vae_park_budget
from ...models.resolve import DTYPE_BYTES, choose_dtypes
from ...vae.working_set import exact_working_set
from ..budget import GIB, Budget
from ..cost import stage_cost
from ..plan import GenerationPlan
from ..preview_plan import fit as fit_preview
from .adapter_estimate import controlnet_extra_bytes, controlnet_unet_extra, ip_adapter_extra_bytes
from .estimate import rank_latent_rows, weight_bytes
from .host import host_bytes
from .planner import BudgetError, choose_knobs


def device_budget(plan: GenerationPlan) -> Budget:
    """The budget the stages are planned for: the one asked for, else the GPU's free memory, else
    the CPU's share of RAM; none (the fastest plan) for a dry run for a GPU absent here."""
    if plan.budget is not None and plan.budget.asked:
        return plan.budget
    if plan.planned_elsewhere:
        return Budget(None, "none")
    if plan.device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(plan.device))[0]
        return Budget(free / GIB, f"the free memory of {plan.device}")
    # host memory, with room left for what the planner does not count
    return Budget(cpu_plan_budget() / GIB, CPU_PLAN_SHARE_WORDS)


def pricing_gpu(plan: GenerationPlan):
    """The GPU a CUDA plan is priced for: --gpu, else the one here; None when planning for a GPU
    absent here that no --gpu names (its speed is unknown: the plan is not priced)."""
    if plan.gpu is not None:
        return GPUS[plan.gpu]
    if not plan.planned_elsewhere and plan.device.startswith("cuda"):
        dev = torch.device(plan.device)
        props = torch.cuda.get_device_properties(dev)
        return detected_gpu(props.name, props.total_memory / GIB)
    return None


def _pricer(plan: GenerationPlan, ledger, gpu, stage):
    """MemoryPlan -> the stage's predicted seconds on `gpu` (planning/cost.py)."""
    info = plan.model_info
    weights = weight_bytes(info.unet_config, info.vae_config, DTYPE_BYTES[plan.dtype],
                           vae_bytes=DTYPE_BYTES[plan.vae_dtype])
    return lambda memory: stage_cost(ledger, gpu, stage, memory, weights)


def add_memory_plans(plan: GenerationPlan, ledger_for=None) -> GenerationPlan:
    """Give every stage the fastest memory plan that fits the budget (PlanError if none does).

    ledger_for: plan -> a planning.cost.Ledger (tracing.ledger builds one; handed in from above):
    a CUDA plan's fitting plans are then ranked by their predicted seconds on the plan's GPU
    (pricing_gpu: --gpu or the one here) and every stage carries the cost of the plan that runs;
    without it, on the CPU, or for an unnamed GPU absent here, the first fitting plan in the
    planner's candidate order.

    Forced knobs (--vae-tile, a preset's `memory:`) are constraints of the search, so the
    estimate printed is the one of the plan that runs. Every stage is planned before a refusal,
    so the refusal names the smallest budget for the whole run, not for its first stage short.
    """
    resolved = device_budget(plan)
    budget, source = resolved.bytes, resolved.too_small()
    kind = figures.device_kind(plan.device)
    fixed = _fixed_knobs(plan)
    plans, short = [], []  # short: (bytes the stage needs at least, stage)
    free_host = None if plan.planned_elsewhere else hostmem.host_memory().available
    gpu = pricing_gpu(plan) if kind == "cuda" and ledger_for is not None else None
    priced = gpu is not None
    ledger = ledger_for(plan) if priced else None
    costs, previews = [], []
    for stage in plan.stages:
        cost_of = _pricer(plan, ledger, gpu, stage) if priced else None
        held = held_bytes(plan, stage, kind, DTYPE_BYTES[plan.dtype])
        host_fits = None if free_host is None else (  # prefer plans this machine's RAM can hold
            lambda m, stage=stage: round(host_need(plan, plan.model_info, stage, m) / GIB, 2)
            * processes_here(plan.world_size) <= free_host / GIB)
        try:
            memory = choose_knobs(**knob_args(plan, stage, kind, DTYPE_BYTES[plan.dtype],
                                               DTYPE_BYTES[plan.vae_dtype], fixed),
                                  budget_bytes=1 << 62 if budget is None else max(budget - held, 1),
                                  host_fits=host_fits,
                                  price=None if cost_of is None else lambda m: cost_of(m).seconds())
        except BudgetError as exc:
            short.append((exc.needed_bytes + held, stage))
            continue
        control = _adapter_bytes(plan, plan.model_info.unet_config, stage, DTYPE_BYTES[plan.dtype])
        preview = _stage_preview(plan, stage, None if budget is None else
                                 budget - held - int(memory.estimated_peak_gib * GIB))
        previews.append(preview)
        extra = control + (preview.bytes if preview is not None else 0)
        if extra:
            memory = replace(memory, estimated_peak_gib=round(memory.estimated_peak_gib + extra / 2 ** 30, 2))
        host = host_need(plan, plan.model_info, stage, memory)
        memory = replace(memory, estimated_host_gib=round(host / 2 ** 30, 2),
                         **vae_modes(plan, stage, memory, budget if kind == "cpu" else None))
        plans.append(memory)
        costs.append(cost_of(memory) if cost_of is not None else None)
    if short:
        raise PlanError(_refusal(plan, short, kind, fixed, source, free_host))
    _check_host(plan, plans)
    shown = resolved if resolved.gib is None else replace(resolved, gib=round(resolved.gib, 2))
    plan = replace(plan.with_memory(plans), budget=shown, gpu=gpu.name if priced else None)
    if plan.preview is not None:
        plan = replace(plan, preview=replace(plan.preview, stages=tuple(previews)))
    if not priced:
        return replace(plan, predicted_s=None)
    stages = tuple(replace(s, cost=c.to_dict()) for s, c in zip(plan.stages, costs))
    return replace(plan, stages=stages, predicted_s=round(sum(c.seconds() for c in costs), 2))


def _stage_preview(plan: GenerationPlan, stage, room: int | None):
    """The stage's --preview within the room its memory plan leaves under the budget (it never
    changes the knobs, so never the image); None without a preview or room for one."""
    if plan.preview is None:
        return None
    return fit_preview(plan.preview, stage, room, dtype_bytes=DTYPE_BYTES[plan.dtype],
                       vae_bytes=DTYPE_BYTES[plan.vae_dtype])


def host_need(plan: GenerationPlan, info, stage, memory) -> int:
    """Host RAM the stage needs under its memory plan (memory/host.py), per process: under band
    parallelism a rank parks the skips of its own rows."""
    db = DTYPE_BYTES[plan.dtype]
    weights = weight_bytes(info.unet_config, info.vae_config, db,
                           vae_bytes=DTYPE_BYTES[plan.vae_dtype])
    nets = sum(1 for kind in CONTROLNET_KINDS if getattr(plan.adapters, kind) is not None)
    rows = rank_latent_rows(info.unet_config, -(-stage.height // 8), plan.world_size)
    return host_bytes(info.unet_config, width=stage.width, height=stage.height, dtype_bytes=db,
                      guidance=stage.guidance > 1, knobs=memory, weights=weights,
                      controlnets=nets, latent_rows=rows)["total"]


def vae_modes(plan: GenerationPlan, stage, memory, cpu_budget: int | None) -> dict:
    """The tiled VAE's statistics mode for the stage's decode (and img2img encode), decided here
    so --dry-run shows what runs: exact when its host working set fits the share of host memory
    the VAE may park in (hostmem.VAE_PARK_SHARE of the CPU plan's budget, else of free RAM).
    Under band parallelism: the busiest rank's tiles against this process's part of that share
    (the other ranks on this machine park theirs beside it)."""
    host = vae_park_budget(cpu_budget) // processes_here(plan.world_size)
    config, itemsize = plan.model_info.vae_config, DTYPE_BYTES[plan.vae_dtype]

    def mode(decoder: bool) -> str:
        if not memory.vae_tile_px:
            return "untiled"
        need = exact_working_set(config, width=stage.width, height=stage.height,
                                 tile_px=memory.vae_tile_px, decoder=decoder, itemsize=itemsize,
                                 ranks=plan.world_size)
        return "exact" if need <= host else "estimated"

    return dict(vae_decode_mode=mode(True), vae_encode_mode=mode(False) if stage.strength is not None else "",
                vae_host_gib=round(host / 2 ** 30, 2))


def _check_host(plan: GenerationPlan, plans) -> None:
    """Refuse, before anything loads, a plan whose host RAM this machine does not have; on the
    CPU the device is that RAM too, so a --max-vram above it plans what cannot run."""
    if plan.planned_elsewhere or not plans:
        return  # planned for another machine: its RAM is unknown here (the dry run shows it)
    here = processes_here(plan.world_size)  # each rank on this machine needs as much
    free = hostmem.host_memory().available / 2 ** 30
    need = max(p.estimated_host_gib for p in plans) * here
    if need > free:
        worst = max(range(len(plans)), key=lambda i: plans[i].estimated_host_gib)
        each = f" ({here} processes here)" if here > 1 else ""
        raise PlanError(f"stage {worst + 1} needs {need:.1f} GiB of host memory{each} (parked "
                        f"skips, offloaded weights, images); this machine has {free:.1f} GiB free")
    if not plan.device.startswith("cuda"):
        needs = [(p.estimated_peak_gib + p.estimated_host_gib) * here for p in plans]
        worst = max(range(len(plans)), key=lambda i: needs[i])
        if needs[worst] > free:
            asked = plan.budget is not None and plan.budget.asked and plan.budget.gib > free
            why = f" ({plan.budget.source} {plan.budget.gib:g} is more than the RAM)" if asked else ""
            each = f" ({here} processes here)" if here > 1 else ""
            raise PlanError(f"on the CPU the device is this machine's RAM: stage {worst + 1} needs "
                            f"~{needs[worst]:.1f} GiB{each}{why}, and {free:.1f} GiB is free; pass a "
                            f"--max-vram of at most {free:.1f} for a tighter plan, or a smaller size")


def _fixed_knobs(plan: GenerationPlan) -> dict:
    fixed = dict(plan.memory_fixed)
    if plan.vae_tile_px is not None:
        fixed["vae_tile_px"] = plan.vae_tile_px
    return fixed


def held_bytes(plan: GenerationPlan, stage, kind: str, dtype_bytes: int) -> int:
    """What a stage holds beside the planner's estimate: its images in host memory on the CPU
    (previous, resized, new) and the ControlNet/IP-Adapter weights and inputs."""
    images = 3 * 3 * stage.width * stage.height if kind == "cpu" else 0
    return images + _adapter_bytes(plan, plan.model_info.unet_config, stage, dtype_bytes)


def knob_args(plan: GenerationPlan, stage, kind: str, dtype_bytes: int, vae_bytes: int,
               fixed: dict) -> dict:
    """choose_knobs' arguments for one stage, but the budget."""
    info = plan.model_info
    return dict(unet_config=info.unet_config, vae_config=info.vae_config, width=stage.width,
                height=stage.height, dtype_bytes=dtype_bytes, vae_bytes=vae_bytes,
                guidance=stage.guidance > 1, linfusion=plan.linfusion is not None, device=kind,
                fixed=fixed, dilated_pass=stage.method == "demofusion", world_size=plan.world_size,
                unet_extra=_controlnet_step(plan, info.unet_config, stage, dtype_bytes))


def smallest_budget(plan: GenerationPlan, device: str | None = None, dtype: str | None = None,
                    vae_dtype: str | None = None) -> tuple[int, object]:
    """(bytes, stage): the smallest budget every stage of the run fits with its tightest plan,
    and the stage that sets it; for the plan's device and dtypes unless others are given."""
    kind = device or figures.device_kind(plan.device)
    db, vb = DTYPE_BYTES[dtype or plan.dtype], DTYPE_BYTES[vae_dtype or plan.vae_dtype]
    fixed, needed = _fixed_knobs(plan), (0, plan.stages[0])
    for stage in plan.stages:
        held = held_bytes(plan, stage, kind, db)
        try:
            choose_knobs(**knob_args(plan, stage, kind, db, vb, fixed), budget_bytes=1)
        except BudgetError as exc:
            needed = max(needed, (exc.needed_bytes + held, stage), key=lambda n: n[0])
    return needed


def _gib_up(n: int) -> str:
    """GiB rounded up to 0.1, so the figure quoted is a budget that works."""
    return f"{math.ceil(n / 2 ** 30 * 10 - 1e-9) / 10:.1f}"


def _refusal(plan: GenerationPlan, short: list, kind: str, fixed: dict, source: str,
             free_host: int | None = None) -> str:
    """One line: the smallest budget for the whole run, which memory, and what would work (on
    the CPU never a --max-vram beyond the RAM free)."""
    needed, stage = max(short, key=lambda s: s[0])
    if kind == "cpu" and free_host is not None and needed * processes_here(plan.world_size) > free_host:
        source = (f"{source.removesuffix('; pass --max-vram to allow more')}; this machine has "
                  f"{free_host / GIB:.1f} GiB of RAM free, less than that: no --max-vram makes it "
                  "fit on the CPU")
    forced = f" with {', '.join(f'{k}={v}' for k, v in fixed.items())}" if fixed else ""
    where = "GPU memory" if kind == "cuda" else "host memory (running on the CPU)"
    line = (f"this run needs at least {_gib_up(needed)} GiB of {where} with the tightest plan{forced} "
            f"(stage {stage.index + 1} of {len(plan.stages)}, {stage.width}x{stage.height}, sets it; "
            f"{len(short)} stage{'s' if len(short) > 1 else ''} do{'' if len(short) > 1 else 'es'} "
            f"not fit); {source}")
    if kind == "cuda":
        return line + f"; `--dry-run --max-vram {_gib_up(needed)}` shows the plan that fits"

    unet, vae = choose_dtypes(plan.dtype if plan.dtype in ("fp16", "bf16") else "fp16", "cuda", True)
    gpu, _ = smallest_budget(plan, "cuda", unet, vae)
    return (line + f"; linfusion expects a CUDA GPU: there this run needs {_gib_up(gpu)} GiB "
            f"({unet}), and `--dry-run --max-vram {_gib_up(gpu)}` shows its plan")


def _controlnet_configs(plan: GenerationPlan, stage) -> list[dict]:
    """The configs of the ControlNets the stage runs, as the plan derived them."""
    return [spec.config for spec in plan.adapters.controlnets(stage.controlnets)]


def _adapter_bytes(plan: GenerationPlan, unet_cfg: dict, stage, dtype_bytes: int) -> int:
    """Weights of the stage's ControlNets and of the IP-Adapter (planning.memory.adapter_estimate)."""
    return controlnet_extra_bytes(_controlnet_configs(plan, stage), dtype_bytes) \
        + ip_adapter_extra_bytes(plan.adapters.ip_adapter, plan.family, dtype_bytes, unet_cfg)


def _controlnet_step(plan: GenerationPlan, unet_cfg: dict, stage, dtype_bytes: int):
    """knobs -> what a ControlNet step adds to the UNet's activations (None without one)."""
    return controlnet_unet_extra(_controlnet_configs(plan, stage), unet_cfg, width=stage.width,
                                 height=stage.height, guidance=stage.guidance > 1,
                                 dtype_bytes=dtype_bytes, linfusion=plan.linfusion is not None)
