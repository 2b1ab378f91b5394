"""The DemoFusion-style img2img stage: one call of the official LinFusion SD-XL super-resolution
pipeline, on our shared components, tiled VAE and memory knobs, for every family.

Per stage: resize (bicubic, PIL's default there), encode, noise to `strength`; each step runs
(a) the UNet on the latents after a skip residual toward the noised input (weight c1) and
(b) the UNet again with dilated convs on a Gaussian-blurred copy, the two scheduler steps mixed
with weight c2; finally the latents take the encoded input's per-channel mean and std.
Random draws, in order, from one CPU generator seeded with the stage seed: the VAE posterior
sample, the noise (one tensor for every step's noised input), then each scheduler step's own
draws (pass 1, pass 2), as the official pipeline makes them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .. import vae as tiled_vae
from ..planning.plan import Stage
from ..runtime.applied import KnobsInEffect
from .demofusion import blurred_input, dilated_convs, match_stats, step_weights
from .events import PhaseProgress
from .context import StageContext, cpu_generator, decode, vae_plan
from .preview import watching


@dataclass
class Conditioning:
    """Text conditioning for one stage: embeddings (B, L, D) and SD-XL's added inputs."""

    embeds: torch.Tensor
    added: dict | None
    guided: bool  # classifier-free guidance: batch of 2, uncond first


def conditioning(pipe, prompt: str, negative: str | None, guidance: float, width: int,
                 height: int, device) -> Conditioning:
    """Prompt embeddings (and SD-XL size conditioning: original = target = the stage's size)."""
    guided = guidance > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
    if not hasattr(pipe, "text_encoder_2"):  # SD1.x / SD2.x
        embeds, negative_embeds = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=guided, negative_prompt=negative)
        if guided:
            embeds = torch.cat([negative_embeds, embeds])
        return Conditioning(embeds.to(device), None, guided)
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompt, device=device, num_images_per_prompt=1,
        do_classifier_free_guidance=guided, negative_prompt=negative)
    projection = (pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None
                  else int(pooled.shape[-1]))
    time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=embeds.dtype,
                                      text_encoder_projection_dim=projection)  # (1, 6)
    if guided:
        embeds = torch.cat([negative_embeds, embeds])
        pooled = torch.cat([negative_pooled, pooled])
        time_ids = torch.cat([time_ids, time_ids])
    added = {"text_embeds": pooled.to(device), "time_ids": time_ids.to(device)}
    return Conditioning(embeds.to(device), added, guided)


def _predict(unet, scheduler, latents: torch.Tensor, t, cond: Conditioning, guidance: float):
    """Guided noise prediction for latents (1, 4, h, w) at t."""
    x = torch.cat([latents] * 2) if cond.guided else latents
    x = scheduler.scale_model_input(x, t)
    out = unet(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=cond.added,
               return_dict=False)[0]
    if cond.guided:
        uncond, text = out.chunk(2)
        out = uncond + guidance * (text - uncond)
    return out


def _step_kwargs(scheduler, generator) -> dict:
    """eta = 0 and the generator, for the schedulers whose step takes them."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {"eta": 0.0} if "eta" in params else {}
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def _state(scheduler) -> dict:
    """The scheduler's mutable state (step index, multistep history), to run a step twice."""
    return {k: list(v) if isinstance(v, list) else v for k, v in vars(scheduler).items()}


def truncated_timesteps(scheduler, steps: int, denoise_steps: int, device) -> torch.Tensor:
    """The schedule of `steps`, minus its first steps - denoise_steps (img2img's start point)."""
    scheduler.set_timesteps(steps, device=device)
    return scheduler.timesteps[(steps - denoise_steps) * scheduler.order:]


def denoise(unet, scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps, cond: Conditioning,
            guidance: float, settings, generator, on_step=None) -> torch.Tensor:
    """The DemoFusion denoising loop from clean latents x0 (1, 4, h, w); returns latents, stats
    matched to x0's. The scheduler must have been set to the schedule `timesteps` comes from."""
    train_steps = scheduler.config.num_train_timesteps
    kwargs = _step_kwargs(scheduler, generator)
    latents = None
    for i, t in enumerate(timesteps):
        w = step_weights(t, train_steps, settings.cosine_scale_1, settings.cosine_scale_2,
                         settings.cosine_scale_3)
        noised = scheduler.add_noise(x0, noise, t.reshape(1))
        latents = noised if latents is None else latents
        latents = latents * (1 - w.skip) + noised * w.skip  # skip residual
        del noised
        before = _state(scheduler)
        first = scheduler.step(_predict(unet, scheduler, latents, t, cond, guidance), t, latents,
                               return_dict=False, **kwargs)[0]
        with dilated_convs(unet, settings.dilation):
            blurred = blurred_input(latents, settings.dilation,
                                    settings.gaussian_sigma * w.sigma_scale)
            # The official pipeline scales this pass's input after the first step (so a
            # step-indexed scheduler such as Euler scales it with the next step's sigma): kept.
            eps = _predict(unet, scheduler, blurred, t, cond, guidance)
            del blurred
        vars(scheduler).update(before)  # the second step starts where the first did
        second = scheduler.step(eps, t, latents, return_dict=False, **kwargs)[0]
        latents = (1 - w.dilated) * first + w.dilated * second
        del first, second, eps
        if on_step is not None:
            on_step(i)
    return match_stats(latents, x0.mean(dim=(2, 3), keepdim=True), x0.std(dim=(2, 3), keepdim=True))


def resize(image: np.ndarray, width: int, height: int) -> Image.Image:
    """Bicubic resize of the previous image (PIL's default, which the official pipeline uses)."""
    return Image.fromarray(image).resize((width, height), Image.BICUBIC)


def demofusion_image_to_image(ctx: StageContext, stage: Stage, previous: np.ndarray | None,
                              knobs: KnobsInEffect) -> np.ndarray:
    """Resize, tiled encode, DemoFusion denoising from `strength`, tiled decode (`knobs`, the
    stage function's fourth argument, is for ControlNets, which DemoFusion stages do not take)."""
    pipe, plan = ctx.model.pipe, ctx.plan
    device = pipe._execution_device
    upscaled = resize(previous, stage.width, stage.height)
    generator = cpu_generator(stage.seed)  # VAE sample, then the noise, then the steps' draws
    progress = lambda done, total: ctx.on_event(PhaseProgress(stage.index, "encode", done, total))  # noqa: E731
    ctx.phases.enter("vae_encode")
    x0 = tiled_vae.encode(pipe.vae, upscaled, generator=generator, on_tile=progress,
                          **vae_plan(ctx, stage, "encode"))
    del upscaled
    x0 = x0.to(device=device, dtype=ctx.model.dtype)  # (1, 4, h, w)
    cond = conditioning(pipe, plan.prompt, plan.negative or None, stage.guidance, stage.width,
                        stage.height, device)
    from diffusers.utils.torch_utils import randn_tensor

    timesteps = truncated_timesteps(pipe.scheduler, stage.steps, stage.denoise_steps, device)
    noise = randn_tensor(x0.shape, generator=generator, device=device, dtype=x0.dtype)

    with watching(ctx.preview, stage, pipe.scheduler) as watch:  # --preview: x0 of the first pass
        def on_step(i):
            ctx.on_event(PhaseProgress(stage.index, "denoise", i + 1, stage.denoise_steps))
            watch.step_done(i)

        latents = denoise(pipe.unet, pipe.scheduler, x0, noise, timesteps, cond, stage.guidance,
                          stage.demofusion, generator, on_step)
    del x0, noise
    return decode(ctx, stage, latents)
