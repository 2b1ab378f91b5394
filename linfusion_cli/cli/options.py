"""The options generate, upscale and batch share: GenerationOptions, made from schema.OPTIONS.

No `from __future__ import annotations` here: Typer reads these annotations as objects when
`shared_options` splices the dataclass's fields into a command's signature.
"""

import functools
import inspect
from dataclasses import field, fields, make_dataclass
from typing import Annotated, Optional

import typer
from ..planning.request import Request
from ..schema import check_request, flag_options

Output = Annotated[Optional[str], typer.Option("-o", "--output", help="Output file, folder (the name is made from the prompt), or - for the image on stdout; printed as given.")]
Template = Annotated[Optional[str], typer.Option("--name", help="File name template in -o: {index} {seed} {slug} {width} {height} {ext}, with format specs (default {index:04d}-{slug}.{ext}).")]


def _request(self, prompt: str, **extra):
    """The Request these flags ask for, every value under its option's rule, before any batch
    line or model."""
    values = {}
    for option in flag_options():
        value = getattr(self, option.name)
        if option.plan and value is not None:
            values[option.name] = option.parse(value, option.named) if option.parse else value
    req = Request(prompt=prompt, **{**values, **extra})
    check_request(req)
    return req


# Every flag the generating commands share: one field per declared option with flags, typed and
# documented for Typer (`--help`, README's options table) from its declaration.
GenerationOptions = make_dataclass(
    "GenerationOptions",
    [(o.name, Annotated[o.cli_type, typer.Option(*o.flags, help=o.help)], field(default=o.cli_default))
     for o in flag_options()],
    frozen=True, namespace={"request": _request, "__doc__": "The flags generate, upscale and batch share."})
GenerationOptions.__module__ = __name__
Json = {f.name: f.type for f in fields(GenerationOptions)}["json"]  # `linfusion info --json` too


def shared_options(command):
    """Give a command its GenerationOptions fields (the options declared for the command of the
    function's name) as its own options; it receives `opts`, the others at their defaults.

    Typer builds options from `inspect.signature`, so the dataclass's fields are spliced into
    the signature in place of the `opts` parameter, and gathered back on the way in.
    """
    names = [o.name for o in flag_options() if command.__name__ in o.commands]
    signature = inspect.signature(command, eval_str=True)  # the command's own annotations as objects
    own = [p for p in signature.parameters.values() if p.name != "opts"]
    spliced = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                 annotation=f.type) for f in fields(GenerationOptions) if f.name in names]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        opts = GenerationOptions(**{name: kwargs.pop(name) for name in names if name in kwargs})
        return command(*args, opts=opts, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + spliced)
    wrapper.__annotations__ = {p.name: p.annotation for p in own + spliced}
    del wrapper.__wrapped__  # Typer must read the spliced signature, not the original
    return wrapper
