"""What the user asked for -> one frozen, validated plan with a memory plan per stage.

Request holds flags/batch fields (None: the preset's value); make_plan resolves preset, model,
size, device and adapters; memory/fit.add_memory_plans picks each stage's knobs under
the budget.
Nothing here loads weights.
"""

from __future__ import annotations

import secrets
from dataclasses import replace

import torch

from .. import parallel, validate
from ..adapters import check_adapters
from ..adapters.specs import CONTROLNET_KINDS, AdapterSpecs
from ..attention.checkpoint import check_source
from ..errors import InputError, PlanError
from ..gpus import GPUS
from ..inputs import expand
from ..models.loading import native_bf16, resolve_device
from ..models.resolve import TRAINED_SHORT_SIDE, choose_dtypes, resolve_linfusion, resolve_model
from ..schema import check_request, plan_options
from .budget import Budget
from .memory.fit import add_memory_plans
from .memory.knob_table import excluded
from .method import DemoFusion, trained_px, with_method
from .plan import GenerationPlan, build_plan, check_size, size_from_res
from .preset_keys import merged_request, name_preset_key
from .option_classes import Preset, Request
from .presets import load_preset
from .preview_plan import plan_preview

DEFAULT_RES = 4096


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
    conflict = excluded(plan.memory_fixed.get("offload", "none"), banded=True)
    if conflict:
        raise PlanError(conflict)
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


def plan_request(req: Request, model_info=None, ledger_for=None) -> GenerationPlan:
    """make_plan then add_memory_plans: the plan a run follows and a dry run prints
    (ledger_for: see add_memory_plans)."""
    return add_memory_plans(make_plan(req, model_info), ledger_for)
