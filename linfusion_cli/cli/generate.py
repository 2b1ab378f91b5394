"""`linfusion generate PROMPT`: text to a very large image by progressive upscaling."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import runner, validate
from ..errors import InputError
from ..presets import SCHEDULERS
from . import common
from .options import (AllowPickle, Aspect, ModelConfig, Device, DryRun, Dtype, Format, Guidance, Height, Json,
                      Linfusion, MaxVram, Model, Negative, NoLinfusion, Output, Overwrite, PresetOpt,
                      Quiet, Res, SaveStages, Scheduler, Seed, Steps, Strengths, VaeTile, Verbose,
                      Width, parse_strengths)


def request_from_options(prompt, *, preset, res, aspect, width, height, model, linfusion, no_linfusion,
                         seed, steps, guidance, negative, strengths, scheduler, max_vram, vae_tile,
                         save_stages, device, dtype, init_image=None, init_size=None) -> runner.Request:
    """The flags every generating command shares, as one Request."""
    if scheduler is not None and scheduler not in SCHEDULERS:  # before any weights load
        raise InputError(f"unknown scheduler {scheduler!r}; use {', '.join(SCHEDULERS)}")
    req = runner.Request(
        prompt=prompt, preset=preset, res=res, aspect=aspect, width=width, height=height, model=model,
        linfusion=linfusion, no_linfusion=no_linfusion, seed=None if seed == -1 else seed,
        steps=steps, guidance=guidance, negative=negative, strengths=parse_strengths(strengths), scheduler=scheduler,
        max_vram=max_vram, vae_tile=vae_tile, device=device, dtype=dtype, save_stages=save_stages,
        init_image=init_image, init_size=init_size)
    validate.request(req)  # flags are checked once, before any batch line or model
    return req


def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; - (or none, with piped stdin) reads stdin.")] = None,
    res: Res = None, aspect: Aspect = None, width: Width = None, height: Height = None,
    model: Model = None, linfusion: Linfusion = None, no_linfusion: NoLinfusion = False,
    preset: PresetOpt = None, seed: Seed = None, steps: Steps = None, guidance: Guidance = None,
    negative: Negative = None, strengths: Strengths = None, scheduler: Scheduler = None,
    max_vram: MaxVram = None, vae_tile: VaeTile = None, save_stages: SaveStages = False,
    output: Output = None, format: Format = None, overwrite: Overwrite = False, json: Json = False,
    dry_run: DryRun = False, device: Device = None, dtype: Dtype = None,
    allow_pickle: AllowPickle = False, config: ModelConfig = None, quiet: Quiet = False, verbose: Verbose = False,
) -> None:
    """Generate an image: a base at the model's native size, then x2 img2img stages to --res."""
    text = common.read_prompt_argument(prompt)
    req = request_from_options(
        text, preset=preset, res=res, aspect=aspect, width=width, height=height, model=model,
        linfusion=linfusion, no_linfusion=no_linfusion, seed=seed, steps=steps, guidance=guidance,
        negative=negative, strengths=strengths, scheduler=scheduler, max_vram=max_vram,
        vae_tile=vae_tile, save_stages=save_stages, device=device, dtype=dtype)
    common.plan_and_run(req, dry_run=dry_run, as_json=json, output=output, fmt=format,
                        overwrite=overwrite, quiet=quiet, verbose=verbose,
                        allow_pickle=allow_pickle, config=config)
