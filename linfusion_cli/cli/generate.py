"""`linfusion generate PROMPT`: text to a very large image by progressive upscaling."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..parallel.world import launched
from . import common
from .options import GenerationOptions, Output, shared_options


@launched  # under torchrun: one image over every rank (band parallelism)
@shared_options
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; - (or none, with piped stdin) reads stdin.")] = None,
    output: Output = None, *, opts: GenerationOptions,
) -> None:
    """Generate an image: a base at the model's trained size, then x2 img2img stages to --res."""
    text = common.shared_prompt(prompt)
    common.plan_and_run(opts.request(text), opts, output=output)
