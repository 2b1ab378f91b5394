"""`linfusion upscale IMAGE [PROMPT]`: the img2img ladder from an existing image."""

from __future__ import annotations

from typing import Annotated, Optional

import numpy as np
import typer

from ..output import open_image
from . import common
from .generate import request_from_options
from .options import (AllowPickle, Aspect, ModelConfig, Device, DryRun, Dtype, Format, Guidance, Height, Json,
                      Linfusion, MaxVram, Method, Model, Negative, NoLinfusion, Output, Overwrite, PresetOpt,
                      Quiet, Res, SaveStages, Scheduler, Seed, Steps, Strengths, VaeTile, Verbose,
                      Width, LoraOpt, ControlNetOpt, ControlImage, ControlScale, TileControlNet,
                      TileScale, IpAdapter, IpImage, IpScale, IpEncoder)


def upscale(
    image: Annotated[str, typer.Argument(help="The image to upscale (PNG, JPEG, TIFF; 16K is fine).")],
    prompt: Annotated[Optional[str], typer.Argument(help="What the image shows (guides the detail).")] = None,
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
    """Upscale an existing image by x2 img2img stages to --res (keeps its aspect by default)."""
    picture = open_image(image)
    req = request_from_options(
        common.read_prompt_argument(prompt) if prompt is not None else "high detail",
        preset=preset, res=res, aspect=aspect, width=width, height=height, model=model,
        linfusion=linfusion, no_linfusion=no_linfusion, seed=seed, steps=steps, guidance=guidance,
        negative=negative, strengths=strengths, scheduler=scheduler, max_vram=max_vram,
        vae_tile=vae_tile, save_stages=save_stages, device=device, dtype=dtype,
        init_image=str(image), init_size=picture.size, loras=lora,
        controlnet=controlnet, control_image=control_image, control_scale=control_scale,
        tile_controlnet=tile_controlnet, tile_scale=tile_scale, ip_adapter=ip_adapter, ip_image=ip_image,
        ip_scale=ip_scale, ip_encoder=ip_encoder, method=method)
    common.plan_and_run(req, dry_run=dry_run, as_json=json, output=output, fmt=format,
                        overwrite=overwrite, quiet=quiet, verbose=verbose,
                        allow_pickle=allow_pickle, config=config, init_image=np.asarray(picture))
