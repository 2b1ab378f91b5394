"""Steps shared by generate, upscale and batch: plan, dry run, model load, one job's output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .. import api
from ..errors import InputError
from .console import ProgressView, info, quiet_libraries


def memory_line(stage) -> str:
    m = stage.memory
    if m is None:
        return ""
    knobs = [f"offload={m.offload}" if m.offload != "none" else "",
             f"vae_tile={m.vae_tile_px}" if m.vae_tile_px else "vae untiled",
             "cfg_split" if m.cfg_split else "", f"ff_chunk={m.ff_chunk}" if m.ff_chunk else "",
             f"attn_chunk={m.attn_chunk}" if m.attn_chunk else "", "inplace" if m.inplace else "",
             "skips_on_cpu" if m.skips_on_cpu else ""]
    return f"~{m.estimated_peak_gib:.1f} GiB ({', '.join(k for k in knobs if k)})"


def print_dry_run(plan, *, as_json: bool, extra: dict | None = None) -> None:
    """The plan on stdout: one JSON object (with `extra` first: a batch line's index and path),
    or a readable table."""
    if as_json:
        print(json.dumps({**(extra or {}), **plan.to_dict()}))
        return
    print(planned_for(plan))
    print(f"model {plan.model} ({plan.family}: {plan.extras.get('family_from', '')}), "
          f"preset {plan.extras.get('preset')}, LinFusion {plan.linfusion or 'off'}, seed {plan.seed}")
    from ..adapters import describe

    for line in describe(plan.adapters):
        print(f"  {line}")
    if plan.extras.get("method_from"):
        print(f"  method: {plan.extras['method_from']}")
    for s in plan.stages:
        kind = "text-to-image" if s.strength is None else f"img2img @{s.strength}"
        if s.method == "sdedit":
            kind += " sdedit"
        elif s.method == "demofusion":
            d = s.demofusion
            kind += (f" demofusion (dilation x{d.dilation}, cosine {d.cosine_scale_1:g}/"
                     f"{d.cosine_scale_2:g}/{d.cosine_scale_3:g}, sigma {d.gaussian_sigma:g})")
        print(f"  stage {s.index + 1}: {s.width}x{s.height} {kind}, {s.denoise_steps} steps, "
              f"seed {s.seed}, {memory_line(s)}")


def planned_for(plan) -> str:
    """The dry run's first line: the device, dtypes and budget the estimates are for."""
    budget = (f"{plan.budget_gib:g} GiB" if plan.budget_gib is not None
              else "no budget given (the fastest plan; pass --max-vram)")
    where = " (no GPU on this machine: planned for one)" if plan.planned_elsewhere else ""
    return (f"planned for {plan.device}{where}, {budget}, UNet {plan.dtype}, VAE {plan.vae_dtype}")


def load(plan, *, verbose: bool, quiet: bool, allow_pickle: bool = False, config: str | None = None):
    """The model for a plan (memory knobs are applied per stage later, not here)."""
    from ..models.loading import load_model

    info(f"loading {plan.model} ...", quiet=quiet)
    quiet_libraries(verbose)
    return load_model(plan.model, dtype=plan.dtype, device=plan.device, linfusion=plan.linfusion,
                      scheduler=plan.stages[0].scheduler, allow_pickle=allow_pickle, config=config,
                      family=plan.family, adapters=plan.adapters)


def run_one(plan, model, *, path, fmt, overwrite, as_json, quiet, verbose, init_image=None) -> dict:
    """Generate one image, write it, print its path (or JSON) on stdout."""
    with ProgressView(quiet=quiet, verbose=verbose) as view:
        result = api.generate_file(plan, model, path=path, fmt=fmt, overwrite=overwrite,
                                      on_event=view, init_image=init_image)
    if path is not None:
        print(json.dumps(result) if as_json else result["path"], flush=True)
    elif as_json:
        info(json.dumps(result), quiet=False)  # stdout carries the image itself
    return result


def plan_and_run(req, opts, *, output, init_image=None) -> None:
    """generate/upscale after parsing: plan, then print it (--dry-run) or run it to a file."""
    from ..io.inputs import expand

    output = expand(output)
    if output == "-" and req.save_stages:
        raise InputError("--save-stages writes files beside the image; it cannot be used with -o -")
    plan = api.plan_request(req)
    if opts.dry_run:  # the output is checked as for a run, but nothing is created
        path, _ = resolve_target(output, plan=plan, fmt=opts.format, overwrite=opts.overwrite, create=False)
        print_dry_run(plan, as_json=opts.json, extra={"path": str(path) if path is not None else "-"})
        return
    not_both_json_and_stdout(output, opts.json)
    path, fmt = resolve_target(output, plan=plan, fmt=opts.format, overwrite=opts.overwrite, create=False)
    loaded = load(plan, verbose=opts.verbose, quiet=opts.quiet, allow_pickle=opts.allow_pickle,
                  config=opts.config)
    if path is not None:  # made only now: a model that fails to load leaves no empty folder
        from ..io.targets import check_directory

        check_directory(path.parent, create=True)
    run_one(plan, loaded, path=path, fmt=fmt, overwrite=opts.overwrite, as_json=opts.json,
            quiet=opts.quiet, verbose=opts.verbose, init_image=init_image)


def read_prompt_argument(prompt: str | None) -> str:
    """PROMPT, or stdin when PROMPT is '-' or absent and stdin is piped."""
    stdin = sys.stdin
    piped = stdin is not None and not _isatty(stdin)
    if prompt == "-" or (prompt is None and piped):
        if stdin is None:
            raise InputError("no prompt on stdin (stdin is closed)")
        try:
            text = stdin.read().strip()
        except UnicodeDecodeError:
            raise InputError("the prompt on stdin is not UTF-8 text") from None
        except (OSError, ValueError):  # a closed stdin
            raise InputError("no prompt on stdin (stdin is closed)") from None
        if not text:
            raise InputError("no prompt on stdin")
        return text
    if prompt is None:
        raise InputError("no prompt given (pass PROMPT, or - to read it from stdin)")
    return prompt


def _open_stream(stream) -> bool:
    """The stream exists and its file descriptor is open."""
    import os

    try:
        os.fstat(stream.fileno())
        return True
    except (AttributeError, OSError, ValueError):
        return False


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


def resolve_target(output, *, plan, fmt, overwrite, template=None, index=0,
                   create=True) -> tuple[Path | None, str]:
    """Output path (None for stdout) and format, checked before any heavy work."""
    from ..io.naming import DEFAULT_TEMPLATE, format_of, resolve_output

    fields = dict(index=index, seed=plan.seed, prompt=plan.prompt, width=plan.width, height=plan.height)
    path = resolve_output(output, template=template or DEFAULT_TEMPLATE, fields=fields, fmt=fmt,
                          overwrite=overwrite, create=create)
    fmt = format_of(path, fmt)
    check_outputs(plan, path, fmt, overwrite=overwrite)
    return path, fmt


def check_outputs(plan, path, fmt, *, overwrite) -> None:
    """Before any model loads: --save-stages files free (or replaceable), room on the disk."""
    from ..io.targets import check_free_space, check_target

    if plan.save_stages and path is not None:
        for stage in plan.stages[:-1]:
            check_target(api.stage_image_path(path, stage.index, stage.width, stage.height),
                         overwrite=overwrite)
    check_free_space(plan, path, fmt)


def not_both_json_and_stdout(output, as_json) -> None:
    if output == "-" and not _open_stream(sys.stdout):
        raise InputError("stdout is closed; use -o FILE")
    if output == "-" and _isatty(sys.stdout):
        raise InputError("refusing to write image bytes to a terminal; redirect stdout or use -o FILE")
