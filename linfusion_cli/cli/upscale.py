"""`linfusion upscale IMAGE [PROMPT]`: the img2img ladder from an existing image."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import numpy as np
import typer

from ..io.images import open_image
from ..parallel.world import current, launched
from ..jobs.processes import shared_prompt
from . import runs
from .options import GenerationOptions, Output, shared_options
from ..inputs import expand


@launched  # under torchrun: one image over every rank (band parallelism)
@shared_options
def upscale(
    image: Annotated[str, typer.Argument(help="The image to upscale (PNG, JPEG, TIFF; 16K is fine).")],
    prompt: Annotated[Optional[str], typer.Argument(help="What the image shows (guides the detail).")] = None,
    output: Output = None, *, opts: GenerationOptions,
) -> None:
    """Upscale an existing image by x2 img2img stages to --res (keeps its aspect by default)."""
    image = expand(image)
    picture = open_image(image)
    text = shared_prompt(prompt, current(), sys.stdin) if prompt is not None else "high detail"
    req = opts.request(text, init_image=str(image), init_size=picture.size)
    runs.plan_and_run(req, opts, output=output, init_image=np.asarray(picture))
