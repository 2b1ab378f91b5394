"""The library's front door: preset + options -> validated plan (with memory) -> files on disk.

The CLI is a thin layer over these functions; scripts can call them directly.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

from . import validate
from .errors import InputError, NonFiniteError, PlanError
from .plan import GenerationPlan, build_plan, check_size, size_from_res
from .presets import Preset, load_preset

DEFAULT_RES = 4096
CPU_VAE_TILE = 1024  # VAE tile size on the CPU, px


@dataclass(frozen=True)
class Request:
    """What the user asked for; None means "the preset's value"."""

    prompt: str
    preset: str | None = None
    res: int | None = None
    aspect: str | None = None
    width: int | None = None
    height: int | None = None
    model: str | None = None
    linfusion: str | None = None  # "auto" / path / repo; see no_linfusion
    no_linfusion: bool = False
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    negative: str | None = None
    strengths: tuple[float, ...] | None = None
    scheduler: str | None = None
    max_vram: float | None = None
    vae_tile: int | None = None
    device: str | None = None
    dtype: str | None = None
    save_stages: bool = False
    init_image: str | None = None
    init_size: tuple[int, int] | None = None


def target_size(req: Request, preset: Preset) -> tuple[int, int]:
    """--width/--height win; else --res with --aspect; else the input image's aspect at --res."""
    if (req.width is None) != (req.height is None):
        raise PlanError("give both --width and --height, or --res")
    if req.width is not None:
        if req.res is not None:
            raise PlanError("--res cannot be combined with --width/--height")
        return req.width, req.height
    res = req.res or DEFAULT_RES
    if res % 8 or res > 32768 or res <= 0:
        check_size(res, res, "--res")
    if req.aspect is None and req.init_size is not None:
        w, h = req.init_size
        return size_from_res(res, f"{w}:{h}")
    return size_from_res(res, req.aspect or preset.aspect)


def _model_family(model: str, preset: Preset) -> str:
    """The family without loading weights: demo names, a local folder's config, else the preset's."""
    from .models.loading import detect_family

    if model == "demo" or model.startswith("demo-"):
        return model.split("-", 1)[1] if "-" in model else "sd15"
    config = Path(model).expanduser() / "unet" / "config.json"
    if config.is_file():
        return detect_family(json.loads(config.read_text()))
    return preset.family


def _resolve_linfusion(linfusion: str | None, model: str, family: str, preset: Preset) -> str | None:
    """"auto" -> the weights for this model when known without loading it (else kept as auto)."""
    from .attention.matching import FAMILY_REPOS, KNOWN_BASES

    if linfusion != "auto":
        return linfusion
    if model == "demo" or model.startswith("demo-"):
        return "fresh"  # the demo's layers start from its own attention weights
    if model in KNOWN_BASES:
        return KNOWN_BASES[model]
    if model == preset.model:
        return FAMILY_REPOS[family]
    return "auto"  # decided from the UNet's architecture once it is loaded


def make_plan(req: Request) -> GenerationPlan:
    """A validated plan, before any weights load."""
    validate.request(req)
    preset = load_preset(req.preset)
    if req.prompt is None or not req.prompt.strip():
        raise InputError("the prompt is empty")
    width, height = target_size(req, preset)
    model = req.model or preset.model
    linfusion = None if req.no_linfusion else (req.linfusion or preset.linfusion)
    seed = req.seed if req.seed is not None else secrets.randbelow(2 ** 32)
    vae_tile = req.vae_tile if req.vae_tile is not None else preset.vae_tile_px
    if vae_tile is not None and (vae_tile < 0 or vae_tile % 8):
        raise PlanError(f"--vae-tile must be 0 (untiled) or a positive multiple of 8, got {vae_tile}")
    family = _model_family(model, preset)
    native = preset.native if family == preset.family else {"sd15": 1024, "sd21": 768, "sdxl": 1024}[family]
    linfusion = _resolve_linfusion(linfusion, model, family, preset)
    return build_plan(
        prompt=req.prompt, negative=req.negative if req.negative is not None else preset.negative,
        width=width, height=height, native=native,
        strengths=list(req.strengths or preset.strengths), steps=req.steps or preset.steps,
        guidance=req.guidance if req.guidance is not None else preset.guidance, seed=seed,
        scheduler=req.scheduler or preset.scheduler, model=model, family=family,
        linfusion=linfusion, init_size=req.init_size, init_image=req.init_image,
        save_stages=req.save_stages, vae_tile_px=vae_tile,
        max_vram_gib=req.max_vram if req.max_vram is not None else preset.max_vram,
        dtype=req.dtype or preset.dtype, device=req.device or "auto",
        extras={"preset": preset.name})


def architecture_configs(plan: GenerationPlan) -> tuple[dict, dict]:
    """UNet and VAE configs for the estimate: the demo's, a local folder's, or the shipped ones."""
    from .memory.planner import load_family_configs

    if plan.model == "demo" or plan.model.startswith("demo-"):
        from .models.tiny import DEMO_UNET_CONFIGS, DEMO_VAE_CONFIG

        return dict(DEMO_UNET_CONFIGS[plan.family]), dict(DEMO_VAE_CONFIG)
    folder = Path(plan.model).expanduser()
    if (folder / "unet" / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        return (json.loads((folder / "unet" / "config.json").read_text()),
                json.loads((folder / "vae" / "config.json").read_text()))
    return load_family_configs(plan.family)


def device_budget(plan: GenerationPlan) -> tuple[str, int, int]:
    """(device type, bytes per UNet value, budget bytes): --max-vram, else the free memory."""
    import psutil
    import torch

    from .models.loading import resolve_device, resolve_dtypes

    device = resolve_device(plan.device)
    dtype, _ = resolve_dtypes(plan.dtype, device)
    if plan.max_vram_gib is not None:
        if plan.max_vram_gib <= 0:
            raise PlanError(f"--max-vram must be positive, got {plan.max_vram_gib}")
        budget = int(plan.max_vram_gib * 2 ** 30)
    elif device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0]
    else:  # host memory: leave room for what the planner does not count (full-size images,
        # the resize, the PNG encoder): a quarter of RAM, at most what is free
        budget = min(psutil.virtual_memory().available, psutil.virtual_memory().total // 4)
    return device.type, torch.finfo(dtype).bits // 8, budget


def plan_memory(plan: GenerationPlan) -> GenerationPlan:
    """Give every stage the fastest memory plan that fits the budget (PlanError if none does)."""
    from .memory.planner import plan_memory as choose

    unet_cfg, vae_cfg = architecture_configs(plan)
    device, dtype_bytes, budget = device_budget(plan)
    plans = []
    for stage in plan.stages:
        stage_budget = budget
        if device == "cpu":  # host memory also holds the stage's uint8 images: previous, resized, new
            stage_budget -= 3 * 3 * stage.width * stage.height
        memory = choose(unet_cfg, vae_cfg, width=stage.width, height=stage.height,
                        dtype_bytes=dtype_bytes, budget_bytes=max(stage_budget, 1),
                        guidance=stage.guidance > 1, linfusion=plan.linfusion is not None,
                        device=device)
        if plan.vae_tile_px is not None:
            memory = replace(memory, vae_tile_px=plan.vae_tile_px)
        elif device == "cpu" and max(stage.width, stage.height) > CPU_VAE_TILE:
            # Big tiles buy a GPU fewer launches; a CPU gains nothing from them but memory use.
            memory = replace(memory, vae_tile_px=min(memory.vae_tile_px or CPU_VAE_TILE, CPU_VAE_TILE))
        plans.append(memory)
    return replace(plan.with_memory(plans), budget_gib=round(budget / 2 ** 30, 2))


def result_summary(path: Path | None, record: dict) -> dict:
    """The --json object for one image: where it is and what made it."""
    return {
        "path": str(path) if path is not None else "-", "prompt": record["prompt"],
        "seed": record["seed"], "width": record["width"], "height": record["height"],
        "model": record["model"], "linfusion": record["linfusion"],
        "stages": [{"width": s["width"], "height": s["height"], "strength": s["strength"],
                    "steps": s["denoise_steps"], "seconds": s["seconds"], "peak_gib": s["peak_gib"]}
                   for s in record["stages"]],
    }


def stage_image_path(final: Path | None, index: int, width: int, height: int) -> Path:
    """Where --save-stages keeps stage `index`: beside the final file."""
    base = final if final is not None else Path.cwd() / "stdout"
    return base.with_name(f"{base.stem}.stage{index + 1}-{width}x{height}.png")


def generate_file(plan: GenerationPlan, model, *, path: Path | None, fmt: str, overwrite: bool = False,
                  on_event=None, init_image=None, stream=None) -> dict:
    """Run a plan and write its image atomically (stdout when path is None); stages kept as asked."""
    from .output import save_image
    from .pipeline import StageFinished, run_plan

    finished = []  # the last finished stage: kept if a later stage fails with NaN/inf

    def handle(event):
        if isinstance(event, StageFinished):
            finished[:] = [event]
        if plan.save_stages and isinstance(event, StageFinished) and event.stage < event.stages - 1:
            stage = plan.stages[event.stage]
            save_image(event.image, stage_image_path(path, event.stage, stage.width, stage.height),
                       record=event.record, fmt="png", overwrite=overwrite)
        if on_event is not None:
            on_event(event)

    try:
        image, record = run_plan(plan, model, on_event=handle, init_image=init_image)
    except NonFiniteError as exc:
        if not finished:
            raise
        last = finished[0]
        stage = plan.stages[last.stage]
        kept = stage_image_path(path, last.stage, stage.width, stage.height)
        if not plan.save_stages:
            save_image(last.image, kept, record=last.record, fmt="png", overwrite=overwrite)
        raise NonFiniteError(exc.part, f"{exc}; stage {last.stage + 1}'s image is kept as {kept}") from None
    written = save_image(image, path, record=record, fmt=fmt, overwrite=overwrite, stream=stream)
    return result_summary(written, record)
