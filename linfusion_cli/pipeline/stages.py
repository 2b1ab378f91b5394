"""The two kinds of stage, one signature: (ctx, stage, previous image, the knobs the stage's memory
plan put on the UNet) -> image uint8 (H, W, 3)."""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from .. import vae as tiled_vae
from ..adapters import controlnet as control
from ..adapters import ip_adapter
from ..planning.plan import Stage
from ..runtime.applied import KnobsInEffect
from . import finite
from .context import StageContext, cpu_generator, decode, vae_plan
from .demofusion_stage import demofusion_image_to_image
from .events import PhaseProgress
from .knobs import vae_on_device
from .preview import watching


def _denoise_kwargs(ctx: StageContext, stage: Stage, watch) -> dict:
    plan = ctx.plan

    def on_step(pipe, step, timestep, tensors):
        ctx.on_event(PhaseProgress(stage.index, "denoise", step + 1, stage.denoise_steps))
        watch.step_done(step)  # --preview: this step's x0, when one is due
        return tensors

    return dict(prompt=plan.prompt, negative_prompt=plan.negative or None,
                num_inference_steps=stage.steps, guidance_scale=stage.guidance,
                output_type="latent", callback_on_step_end=on_step)


def text_to_image(ctx: StageContext, stage: Stage, previous: np.ndarray | None,
                  knobs: KnobsInEffect) -> np.ndarray:
    """The base stage at the model's native size."""
    pipe, extra, done = control.text_to_image_call(ctx, stage, knobs)  # plain txt2img without ControlNet
    try:
        with watching(ctx.preview, stage, pipe.scheduler) as watch:
            out = pipe(height=stage.height, width=stage.width, generator=cpu_generator(stage.seed),
                       **extra, **ip_adapter.stage_kwargs(ctx), **_denoise_kwargs(ctx, stage, watch))
    finally:
        done()
    return decode(ctx, stage, finite.check(out.images, "unet"))


def resize(image: np.ndarray, width: int, height: int) -> Image.Image:
    """Lanczos resize of the previous stage's image (what the published recipe does)."""
    return Image.fromarray(image).resize((width, height), Image.LANCZOS)


def image_to_image(ctx: StageContext, stage: Stage, previous: np.ndarray | None,
                   knobs: KnobsInEffect) -> np.ndarray:
    """Resize, tiled encode, SDEdit denoising from `strength`, tiled decode."""
    upscaled = resize(previous, stage.width, stage.height)
    generator = cpu_generator(stage.seed)  # one generator: VAE sample first, then the noise
    progress = lambda done, total: ctx.on_event(PhaseProgress(stage.index, "encode", done, total))  # noqa: E731
    ctx.phases.enter("vae_encode")
    vae_on_device(ctx.model.pipe.vae)
    latents = tiled_vae.encode(ctx.model.pipe.vae, upscaled, generator=generator, on_tile=progress,
                               **vae_plan(ctx, stage, "encode"))
    pipe, extra, done = control.image_to_image_call(ctx, stage, upscaled, knobs)  # plain without ControlNet
    del upscaled
    latents = finite.check(latents, "vae").to(device=ctx.model.device, dtype=ctx.model.dtype)
    try:
        with watching(ctx.preview, stage, pipe.scheduler) as watch:
            out = pipe(image=latents, strength=stage.strength, generator=generator,
                       **extra, **ip_adapter.stage_kwargs(ctx), **_denoise_kwargs(ctx, stage, watch))
    finally:
        done()
    return decode(ctx, stage, finite.check(out.images, "unet"))


StageFn = Callable[[StageContext, Stage, "np.ndarray | None", KnobsInEffect], np.ndarray]


def stage_function(stage: Stage) -> StageFn:
    if stage.method == "demofusion":
        return demofusion_image_to_image
    return text_to_image if stage.strength is None else image_to_image
