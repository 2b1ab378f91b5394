"""`linfusion generate PROMPT`: text to a very large image by progressive upscaling."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from ..parallel.world import current, launched
from ..jobs.processes import shared_prompt
from . import runs
from .options import GenerationOptions, Output, shared_options


@launched  # under torchrun: one image over every rank (band parallelism)
@shared_options
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; - (or none, with piped stdin) reads stdin.")] = None,
    output: Output = None, *, opts: GenerationOptions,
) -> None:
    """Generate an image: a base at the model's trained size, then x2 img2img stages to --res."""
    text = shared_prompt(prompt, current(), sys.stdin)
    runs.plan_and_run(opts.request(text), opts, output=output)
