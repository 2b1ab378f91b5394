"""The two kinds of stage, one signature: (ctx, stage, previous image) -> image uint8 (H, W, 3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .. import parallel, vae as tiled_vae
from ..adapters import controlnet as control
from ..adapters import ip_adapter
from ..hostmem import vae_park_budget
from ..planning.plan import GenerationPlan, Stage
from .knobs import vae_on_device
from . import finite
from .events import EventHandler, PhaseProgress


@dataclass
class StageContext:
    """What every stage needs: the plan, the shared components, and where progress goes."""

    plan: GenerationPlan
    model: object  # models.loading.LoadedModel
    on_event: EventHandler
    txt2img: object = None  # diffusers pipelines sharing one set of components
    img2img: object = None
    notes: dict = field(default_factory=dict)  # stage index -> {"decode"/"encode": vae.TileReport}

    def __post_init__(self):
        from diffusers import AutoPipelineForImage2Image

        self.txt2img = self.model.pipe
        self.img2img = AutoPipelineForImage2Image.from_pipe(self.txt2img)
        self.img2img.set_progress_bar_config(disable=True)


def _generator(seed: int) -> torch.Generator:
    """Noise is drawn on the CPU so a seed gives the same image on every device."""
    return torch.Generator("cpu").manual_seed(seed)


def _denoise_kwargs(ctx: StageContext, stage: Stage) -> dict:
    plan = ctx.plan

    def on_step(pipe, step, timestep, tensors):
        ctx.on_event(PhaseProgress(stage.index, "denoise", step + 1, stage.denoise_steps))
        return tensors

    return dict(prompt=plan.prompt, negative_prompt=plan.negative or None,
                num_inference_steps=stage.steps, guidance_scale=stage.guidance,
                output_type="latent", callback_on_step_end=on_step)


def _tile_px(ctx: StageContext, stage: Stage) -> int | None:
    """The stage's planned VAE tile (which honours --vae-tile); unplanned: the forced one."""
    return stage.memory.vae_tile_px if stage.memory is not None else ctx.plan.vae_tile_px


def _band_rows(stage: Stage) -> int:
    """The stage's planned band rows for the tiled VAE's whole-latent part (0: whole maps)."""
    return getattr(stage.memory, "band_rows", 0) or 0


def _host_budget(ctx: StageContext) -> int | None:
    """Host memory the VAE's exact mode may park tiles in: on the CPU, its share of the plan's
    budget (hostmem.VAE_PARK_SHARE); on a GPU the host default (None)."""
    if ctx.model.device.type != "cpu" or ctx.plan.budget_gib is None:
        return None
    return vae_park_budget(ctx.plan.budget_gib * 2 ** 30)


def _report_to(ctx: StageContext, stage: Stage, part: str):
    """on_report for the VAE's `part` ("decode"/"encode") of a stage: keeps it for the run record."""
    def keep(report: tiled_vae.TileReport) -> None:
        ctx.notes.setdefault(stage.index, {})[part] = report
    return keep


def _decode(ctx: StageContext, stage: Stage, latents: torch.Tensor) -> np.ndarray:
    """latents (1, 4, h, w) -> uint8 (8h, 8w, 3), tiled as planned."""
    progress = lambda done, total: ctx.on_event(PhaseProgress(stage.index, "decode", done, total))  # noqa: E731
    vae_on_device(ctx.model.pipe.vae)
    return tiled_vae.decode(ctx.model.pipe.vae, latents.to(ctx.model.vae_dtype),
                            tile_px=_tile_px(ctx, stage), on_tile=progress,
                            on_report=_report_to(ctx, stage, "decode"), host_budget=_host_budget(ctx),
                            band_rows=_band_rows(stage), group=parallel.active())


def text_to_image(ctx: StageContext, stage: Stage, previous: np.ndarray | None) -> np.ndarray:
    """The base stage at the model's native size."""
    pipe, extra, done = control.text_to_image_call(ctx, stage)  # plain txt2img without ControlNet
    try:
        out = pipe(height=stage.height, width=stage.width, generator=_generator(stage.seed),
                   **extra, **ip_adapter.stage_kwargs(ctx), **_denoise_kwargs(ctx, stage))
    finally:
        done()
    return _decode(ctx, stage, finite.check(out.images, "unet"))


def resize(image: np.ndarray, width: int, height: int) -> Image.Image:
    """Lanczos resize of the previous stage's image (what the published recipe does)."""
    return Image.fromarray(image).resize((width, height), Image.LANCZOS)


def image_to_image(ctx: StageContext, stage: Stage, previous: np.ndarray | None) -> np.ndarray:
    """Resize, tiled encode, SDEdit denoising from `strength`, tiled decode."""
    upscaled = resize(previous, stage.width, stage.height)
    generator = _generator(stage.seed)  # one generator: VAE sample first, then the noise
    progress = lambda done, total: ctx.on_event(PhaseProgress(stage.index, "encode", done, total))  # noqa: E731
    vae_on_device(ctx.model.pipe.vae)
    latents = tiled_vae.encode(ctx.model.pipe.vae, upscaled, tile_px=_tile_px(ctx, stage),
                               generator=generator, on_tile=progress,
                               on_report=_report_to(ctx, stage, "encode"), host_budget=_host_budget(ctx),
                               band_rows=_band_rows(stage), group=parallel.active())
    pipe, extra, done = control.image_to_image_call(ctx, stage, upscaled)  # plain without ControlNet
    del upscaled
    latents = finite.check(latents, "vae").to(device=ctx.model.device, dtype=ctx.model.dtype)
    try:
        out = pipe(image=latents, strength=stage.strength, generator=generator,
                   **extra, **ip_adapter.stage_kwargs(ctx), **_denoise_kwargs(ctx, stage))
    finally:
        done()
    return _decode(ctx, stage, finite.check(out.images, "unet"))


StageFn = Callable[[StageContext, Stage, "np.ndarray | None"], np.ndarray]


def stage_function(stage: Stage) -> StageFn:
    if stage.method == "demofusion":
        from .demofusion_stage import demofusion_image_to_image

        return demofusion_image_to_image
    return text_to_image if stage.strength is None else image_to_image
