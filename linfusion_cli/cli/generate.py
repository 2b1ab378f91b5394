"""`linfusion generate PROMPT`: text to a very large image by progressive upscaling."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import runner, validate
from ..errors import InputError
from ..method import METHODS
from ..presets import SCHEDULERS
from . import common
from .options import (AllowPickle, Aspect, ModelConfig, Device, DryRun, Dtype, Format, Guidance, Height, Json,
                      Linfusion, MaxVram, Method, Model, Negative, NoLinfusion, Output, Overwrite, PresetOpt,
                      Quiet, Res, SaveStages, Scheduler, Seed, Steps, Strengths, VaeTile, Verbose,
                      Width, LoraOpt, ControlNetOpt, ControlImage, ControlScale, TileControlNet,
                      TileScale, IpAdapter, IpImage, IpScale, IpEncoder, parse_strengths)


def request_from_options(prompt, *, preset, res, aspect, width, height, model, linfusion, no_linfusion,
                         seed, steps, guidance, negative, strengths, scheduler, max_vram, vae_tile,
                         save_stages, device, dtype, init_image=None, init_size=None,
                         loras=None, controlnet=None, control_image=None, control_scale=None,
                         tile_controlnet=None, tile_scale=None, ip_adapter=None, ip_image=None,
                         ip_scale=None, ip_encoder=None, method=None) -> runner.Request:
    """The flags every generating command shares, as one Request."""
    if scheduler is not None and scheduler not in SCHEDULERS:  # before any weights load
        raise InputError(f"unknown scheduler {scheduler!r}; use {', '.join(SCHEDULERS)}")
    if method is not None and method not in METHODS:
        raise InputError(f"unknown method {method!r}; use {' or '.join(METHODS)}")
    req = runner.Request(
        prompt=prompt, preset=preset, res=res, aspect=aspect, width=width, height=height, model=model,
        linfusion=linfusion, no_linfusion=no_linfusion, seed=None if seed == -1 else seed,
        steps=steps, guidance=guidance, negative=negative, strengths=parse_strengths(strengths), scheduler=scheduler,
        max_vram=max_vram, vae_tile=vae_tile, device=device, dtype=dtype, save_stages=save_stages,
        init_image=init_image, init_size=init_size, loras=tuple(loras or ()), controlnet=controlnet,
        control_image=control_image, control_scale=control_scale, tile_controlnet=tile_controlnet,
        tile_scale=tile_scale, ip_adapter=ip_adapter, ip_image=ip_image, ip_scale=ip_scale,
        ip_encoder=ip_encoder, method=method)
    validate.request(req)  # flags are checked once, before any batch line or model
    return req


def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; - (or none, with piped stdin) reads stdin.")] = None,
    res: Res = None, aspect: Aspect = None, width: Width = None, height: Height = None,
    model: Model = None, linfusion: Linfusion = None, no_linfusion: NoLinfusion = False,
    preset: PresetOpt = None, seed: Seed = None, steps: Steps = None, guidance: Guidance = None,
    negative: Negative = None, strengths: Strengths = None, scheduler: Scheduler = None,
    method: Method = None, max_vram: MaxVram = None, vae_tile: VaeTile = None, save_stages: SaveStages = False,
    output: Output = None, format: Format = None, overwrite: Overwrite = False, json: Json = False,
    dry_run: DryRun = False, device: Device = None, dtype: Dtype = None,
    allow_pickle: AllowPickle = False, config: ModelConfig = None, quiet: Quiet = False, verbose: Verbose = False,
    lora: LoraOpt = None, controlnet: ControlNetOpt = None, control_image: ControlImage = None,
    control_scale: ControlScale = None, tile_controlnet: TileControlNet = None, tile_scale: TileScale = None,
    ip_adapter: IpAdapter = None, ip_image: IpImage = None, ip_scale: IpScale = None, ip_encoder: IpEncoder = None,
) -> None:
    """Generate an image: a base at the model's native size, then x2 img2img stages to --res."""
    text = common.read_prompt_argument(prompt)
    req = request_from_options(
        text, preset=preset, res=res, aspect=aspect, width=width, height=height, model=model,
        linfusion=linfusion, no_linfusion=no_linfusion, seed=seed, steps=steps, guidance=guidance,
        negative=negative, strengths=strengths, scheduler=scheduler, max_vram=max_vram,
        vae_tile=vae_tile, save_stages=save_stages, device=device, dtype=dtype, loras=lora,
        controlnet=controlnet, control_image=control_image, control_scale=control_scale,
        tile_controlnet=tile_controlnet, tile_scale=tile_scale, ip_adapter=ip_adapter, ip_image=ip_image,
        ip_scale=ip_scale, ip_encoder=ip_encoder, method=method)
    common.plan_and_run(req, dry_run=dry_run, as_json=json, output=output, fmt=format,
                        overwrite=overwrite, quiet=quiet, verbose=verbose,
                        allow_pickle=allow_pickle, config=config)
