"""What the user asked for -> one frozen, validated plan with a memory plan per stage.

Request holds flags/batch fields (None: the preset's value); make_plan resolves preset, model,
size, device and adapters; add_memory_plans picks each stage's knobs under the budget.
Nothing here loads weights.
"""

from __future__ import annotations

import math
import torch
import secrets
from dataclasses import field, make_dataclass, replace

from .. import validate
from ..schema import check_request, plan_options
from ..errors import InputError, PlanError
from .plan import GenerationPlan, build_plan, check_size, size_from_res
from .presets import Preset, load_preset
from ..adapters import check_adapters
from ..adapters.specs import CONTROLNET_KINDS, AdapterSpecs
from .preset_keys import merged_request, name_preset_key
from ..attention.checkpoint import check_source
from .. import hostmem, parallel
from ..hostmem import CPU_PLAN_SHARE_WORDS, cpu_plan_budget, vae_park_budget
from ..distributed import processes_here
from ..inputs import expand
from ..models.loading import native_bf16, resolve_device
from ..models.resolve import resolve_model, TRAINED_SHORT_SIDE, resolve_linfusion, choose_dtypes, DTYPE_BYTES
from .memory.adapters import controlnet_extra_bytes, ip_adapter_extra_bytes, controlnet_unet_extra
from .memory.estimate import rank_latent_rows, weight_bytes
from .memory.host import host_bytes
from .budget import GIB, Budget
from .memory.planner import BudgetError, choose_knobs
from .cost import stage_cost
from ..gpus import GPUS, detected_gpu
from ..vae.working_set import exact_working_set
from .method import DemoFusion, trained_px, with_method
from .preview import fit as fit_preview, plan_preview

DEFAULT_RES = 4096


# What the user asked for: one field per declared option (schema.OPTIONS with plan=True), each
# None by default, meaning "the preset's value". api.plan's keywords are these fields.
Request = make_dataclass("Request", [(o.name, o.type, field(default=o.default)) for o in plan_options()],
                         frozen=True, namespace={"__doc__": "What the user asked for; None: the preset's value."})
Request.__module__ = __name__


def target_size(req: Request, preset: Preset) -> tuple[int, int]:
    """--width/--height win; else --res with --aspect; else the input image's aspect at --res."""
    if (req.width is None) != (req.height is None):
        raise PlanError("give both --width and --height, or --res")
    if req.width is not None:
        if req.res is not None:
            raise PlanError("--res cannot be combined with --width/--height")
        return req.width, req.height
    res = req.res if req.res is not None else DEFAULT_RES
    if res % 8 or res > 32768 or res <= 0:
        check_size(res, res, "--res")
    if req.aspect is None and req.init_size is not None:
        w, h = req.init_size
        return size_from_res(res, f"{w}:{h}")
    return size_from_res(res, req.aspect or preset.aspect)


PATH_FIELDS = tuple(o.name for o in plan_options() if o.path and o.name != "loras")


def expanded(req: Request) -> Request:
    """`~` expanded in every path the request names (flags, batch lines), as a shell would."""
    changes = {f: expand(getattr(req, f)) for f in PATH_FIELDS if isinstance(getattr(req, f), str)
               and getattr(req, f).startswith("~")}
    if any(x.startswith("~") for x in req.loras):
        changes["loras"] = tuple(expand(x) for x in req.loras)
    return replace(req, **changes) if changes else req


def _preset_and_model(req: Request, info=None):
    """The preset (given, else the model's family's) and the resolved model."""
    given = load_preset(req.preset)  # None: the default preset, until the model's family is known
    if info is None:
        info = resolve_model(expand(req.model or given.model), config_dir=req.config,
                             fallback_family=given.family, allow_pickle=req.allow_pickle)
    if req.preset is None and info.family != given.family:
        return load_preset(info.family), info
    return given, info


def _base_short_side(preset: Preset, family: str) -> int:
    """The base stage's short side: the preset's when it was written for this family, else the
    family's trained size."""
    if preset.native is not None and preset.family == family:
        return preset.native
    return TRAINED_SHORT_SIDE[family]


def make_plan(req: Request, model_info=None) -> GenerationPlan:
    """A validated plan, before any weights load: model resolved, device and dtypes chosen.

    model_info: the model as already known (a caller's open pipeline, resolve.info_of_pipeline);
    None resolves req.model.
    """
    check_request(req)
    if req.prompt is None or not req.prompt.strip():
        raise InputError("the prompt is empty")
    req = expanded(req)
    preset, info = _preset_and_model(req, model_info)
    width, height = target_size(req, preset)
    seed = req.seed if req.seed is not None else secrets.randbelow(validate.SEED_MAX + 1)
    vae_tile = req.vae_tile if req.vae_tile is not None else preset.vae_tile  # both validated
    budget = Budget.given(req.max_vram, "--max-vram") if req.max_vram is not None else (
        Budget.given(preset.max_vram, f"preset {preset.name}'s max_vram") if preset.max_vram is not None else None)
    gpu = GPUS[req.gpu] if req.gpu is not None else None  # validated: a table name
    if budget is None and gpu is not None and req.dry_run and not torch.cuda.is_available():
        budget = Budget.given(gpu.memory_gib, f"--gpu {gpu.name}'s memory")  # planning for it
    max_vram = budget.gib if budget is not None else None
    linfusion = None if req.no_linfusion else resolve_linfusion(req.linfusion or preset.linfusion, info)
    if linfusion not in (None, "fresh"):
        check_source(linfusion)  # a local path must hold weights now, not after the model loaded
    device, dtype, vae_dtype, elsewhere = planned_device(req.device, req.dtype or preset.dtype,
                                                         max_vram, req.dry_run)
    plan = build_plan(
        prompt=req.prompt, negative=req.negative if req.negative is not None else preset.negative,
        width=width, height=height, native=_base_short_side(preset, info.family),
        strengths=list(req.strengths or preset.strengths),
        steps=req.steps if req.steps is not None else preset.steps,
        guidance=req.guidance if req.guidance is not None else preset.guidance, seed=seed,
        scheduler=req.scheduler or preset.scheduler, model=info.model, family=info.family,
        linfusion=linfusion, init_size=req.init_size, init_image=req.init_image,
        save_stages=req.save_stages, vae_tile_px=vae_tile, memory_fixed=dict(preset.memory),
        budget=budget,
        dtype=dtype, vae_dtype=vae_dtype, device=device, planned_elsewhere=elsewhere,
        model_info=info, preset=preset.name, family_from=info.family_from,
        gpu=gpu.name if gpu is not None else None)
    tiles = ((vae_tile, "--vae-tile" if req.vae_tile is not None else f"preset {preset.name}'s vae_tile"),
             (plan.memory_fixed.get("vae_tile_px"), f"preset {preset.name}'s memory.vae_tile_px"))
    for tile, name in tiles:  # millions of tiles at 16K would run for days
        if tile:
            validate.vae_tile_count(tile, plan.width, plan.height, name)
    plan = _with_adapters(plan, req, preset)
    plan = replace(plan, preview=plan_preview(req, family=info.family, model=info.model,
                                              latent_channels=info.vae_config.get("latent_channels", 4)))
    return _with_parallel(_with_method(plan, req, preset), req.world_size or 1)


def _with_parallel(plan: GenerationPlan, world_size: int) -> GenerationPlan:
    """The plan over `world_size` processes, each stage checked: every rank must own latent rows
    at the UNet's coarsest level, the band-wise forward needs LinFusion, and the group's timeout
    is read now (the dry run prints it)."""
    if world_size == 1:
        return plan
    if plan.linfusion is None:
        raise PlanError(f"one image over {world_size} processes needs LinFusion (softmax "
                        "self-attention does not split into bands); drop --no-linfusion")
    if plan.memory_fixed.get("offload") == "sequential":
        raise PlanError("band parallelism does not combine with sequential offload")
    levels = len(plan.model_info.unet_config["down_block_types"]) - 1
    for stage in plan.stages:
        try:
            parallel.check_split(-(-stage.height // 8), levels, world_size)
        except ValueError as exc:
            raise PlanError(f"stage {stage.index + 1} ({stage.width}x{stage.height}): {exc}") from None
    return replace(plan, world_size=world_size, group_timeout_s=parallel.timeout_s())


# adapters the DemoFusion stage does not run (it calls the UNet itself, without their inputs)
_SDEDIT_ONLY = {"controlnet": "--controlnet", "tile_controlnet": "--tile-controlnet",
                "ip_adapter": "--ip-adapter"}


def _with_method(plan: GenerationPlan, req: Request, preset: Preset) -> GenerationPlan:
    """The img2img stages' method (flag, else preset) and DemoFusion settings, dilation per stage.

    A ControlNet or IP-Adapter runs only in SDEdit stages: with one, an explicit
    --method demofusion is refused and a preset's demofusion gives way to sdedit (the plan says so).
    """
    method = req.method or preset.method
    needs_sdedit = [flag for key, flag in _SDEDIT_ONLY.items() if getattr(plan.adapters, key) is not None]
    img2img = any(s.strength is not None for s in plan.stages)
    if method == "demofusion" and needs_sdedit and img2img:
        if req.method == "demofusion":
            raise PlanError(f"--method demofusion does not run {', '.join(needs_sdedit)} in its "
                            "stages; use --method sdedit")
        method = "sdedit"
        plan = replace(plan, method_from=(
            f"sdedit, not preset {preset.name}'s demofusion: {', '.join(needs_sdedit)} "
            "run in SDEdit stages only"))
    settings = DemoFusion(preset.cosine_scale_1, preset.cosine_scale_2, preset.cosine_scale_3,
                          preset.gaussian_sigma)
    info = plan.model_info
    return with_method(plan, method, settings, trained_px(info.unet_config, info.vae_config))


def _with_adapters(plan: GenerationPlan, req: Request, preset: Preset) -> GenerationPlan:
    """Adapters (flags, else the preset's keys) parsed and checked against the model's
    architecture before any weights load, and each stage's ControlNets decided."""
    req, taken = merged_request(req, preset)
    if not any(getattr(req, o.name) not in (None, ()) for o in plan_options() if o.adapter):
        return plan
    try:
        return with_adapters(plan, check_adapters(req, plan.model_info.unet_config, plan))
    except InputError as exc:
        raise name_preset_key(exc, taken, preset) from None


def with_adapters(plan: GenerationPlan, adapters: AdapterSpecs) -> GenerationPlan:
    """The plan with its checked adapters, and which ControlNets each stage runs, decided here
    once (the pipeline and the memory estimate read Stage.controlnets): the ControlNet every
    stage, the tile ControlNet the img2img stages, whose own input is its control image.
    (DemoFusion stages run none: _with_method makes them SDEdit when a ControlNet is planned.)"""
    stages = tuple(replace(s, controlnets=tuple(
        kind for kind in CONTROLNET_KINDS if getattr(adapters, kind) is not None
        and (kind != "tile_controlnet" or s.strength is not None))) for s in plan.stages)
    if adapters.tile_controlnet is not None and not any("tile_controlnet" in s.controlnets for s in stages):
        raise PlanError("--tile-controlnet acts on img2img stages; this plan has none")
    return replace(plan, adapters=adapters, stages=stages)


def planned_device(device: str | None, dtype: str, max_vram: float | None,
                   dry_run: bool) -> tuple[str, str, str, bool]:
    """(device, UNet dtype, VAE dtype, planned for a GPU absent here) for a plan.

    `--device cuda` plans for CUDA without needing one until the run; on a machine without a
    GPU, a dry run with a budget plans for a CUDA GPU of that size (assumed to have bf16, as
    every GPU since Ampere does), since that is what a budget in GiB of VRAM describes.
    """
    name = device or "auto"
    cuda_here = torch.cuda.is_available()
    wants_cuda = name.startswith("cuda") or (name == "auto" and not cuda_here and dry_run
                                            and max_vram is not None)
    if wants_cuda and not cuda_here:
        if not dry_run:
            resolve_device(name)  # the one-line "no CUDA device" error
        unet, vae = choose_dtypes(dtype, "cuda", bf16_ok=True)
        return (name if name != "auto" else "cuda"), unet, vae, True
    resolved = resolve_device(name)
    bf16_ok = native_bf16(resolved)
    unet, vae = choose_dtypes(dtype, resolved.type, bf16_ok)
    return str(resolved), unet, vae, False


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
    kind = "cuda" if plan.device.startswith("cuda") else "cpu"
    fixed = _fixed_knobs(plan)
    plans, short = [], []  # short: (bytes the stage needs at least, stage)
    free_host = None if plan.planned_elsewhere else hostmem.host_memory().available
    gpu = pricing_gpu(plan) if kind == "cuda" and ledger_for is not None else None
    priced = gpu is not None
    ledger = ledger_for(plan) if priced else None
    costs, previews = [], []
    for stage in plan.stages:
        cost_of = _pricer(plan, ledger, gpu, stage) if priced else None
        held = _held_bytes(plan, stage, kind, DTYPE_BYTES[plan.dtype])
        host_fits = None if free_host is None else (  # prefer plans this machine's RAM can hold
            lambda m, stage=stage: round(_host_bytes(plan, plan.model_info, stage, m) / GIB, 2)
            * processes_here(plan.world_size) <= free_host / GIB)
        try:
            memory = choose_knobs(**_knob_args(plan, stage, kind, DTYPE_BYTES[plan.dtype],
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
        host = _host_bytes(plan, plan.model_info, stage, memory)
        memory = replace(memory, estimated_host_gib=round(host / 2 ** 30, 2),
                         **_vae_modes(plan, stage, memory, budget if kind == "cpu" else None))
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


def _host_bytes(plan: GenerationPlan, info, stage, memory) -> int:
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


def _vae_modes(plan: GenerationPlan, stage, memory, cpu_budget: int | None) -> dict:
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


def _held_bytes(plan: GenerationPlan, stage, kind: str, dtype_bytes: int) -> int:
    """What a stage holds beside the planner's estimate: its images in host memory on the CPU
    (previous, resized, new) and the ControlNet/IP-Adapter weights and inputs."""
    images = 3 * 3 * stage.width * stage.height if kind == "cpu" else 0
    return images + _adapter_bytes(plan, plan.model_info.unet_config, stage, dtype_bytes)


def _knob_args(plan: GenerationPlan, stage, kind: str, dtype_bytes: int, vae_bytes: int,
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
    kind = device or ("cuda" if plan.device.startswith("cuda") else "cpu")
    db, vb = DTYPE_BYTES[dtype or plan.dtype], DTYPE_BYTES[vae_dtype or plan.vae_dtype]
    fixed, needed = _fixed_knobs(plan), (0, plan.stages[0])
    for stage in plan.stages:
        held = _held_bytes(plan, stage, kind, db)
        try:
            choose_knobs(**_knob_args(plan, stage, kind, db, vb, fixed), budget_bytes=1)
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
    """Weights of the stage's ControlNets and of the IP-Adapter (planning.memory.adapters)."""
    return controlnet_extra_bytes(_controlnet_configs(plan, stage), dtype_bytes) \
        + ip_adapter_extra_bytes(plan.adapters.ip_adapter, plan.family, dtype_bytes, unet_cfg)


def _controlnet_step(plan: GenerationPlan, unet_cfg: dict, stage, dtype_bytes: int):
    """knobs -> what a ControlNet step adds to the UNet's activations (None without one)."""
    return controlnet_unet_extra(_controlnet_configs(plan, stage), unet_cfg, width=stage.width,
                                 height=stage.height, guidance=stage.guidance > 1,
                                 dtype_bytes=dtype_bytes, linfusion=plan.linfusion is not None)


def plan_request(req: Request, model_info=None, ledger_for=None) -> GenerationPlan:
    """make_plan then add_memory_plans: the plan a run follows and a dry run prints
    (ledger_for: see add_memory_plans)."""
    return add_memory_plans(make_plan(req, model_info), ledger_for)
