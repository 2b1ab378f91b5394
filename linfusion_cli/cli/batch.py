"""`linfusion batch FILE|-`: many prompts, one model load, one stdout line per image."""

from __future__ import annotations

import json as jsonlib
import os
import secrets
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from .. import runner
from ..errors import InputError, LinfusionError, OutputError
from ..output import read_metadata
from ..prompts import read_prompt_file
from . import common
from ..plan import stage_seed
from ..targets import inside
from ..validate import SEED_MAX
from .console import error, info, one_line_of
from .generate import request_from_options
from .options import (AllowPickle, Aspect, ModelConfig, Device, DryRun, Dtype, Format, Guidance, Height, Json,
                      Linfusion, MaxVram, Method, Model, Negative, NoLinfusion, Overwrite, PresetOpt, Quiet,
                      Res, SaveStages, Scheduler, Seed, Steps, Strengths, Template, VaeTile, Verbose,
                      Width, LoraOpt, ControlNetOpt, ControlImage, ControlScale, TileControlNet,
                      TileScale, IpAdapter, IpImage, IpScale, IpEncoder)

BATCH_TEMPLATE = "{index:04d}-{slug}.{ext}"  # no seed: --resume finds the same names again
_SAME = ("prompt", "negative", "seed", "width", "height", "steps", "guidance", "model")


def _entry_plan(entry, index, base: runner.Request, base_seed: int):
    """The entry's own values over the command's; errors name the file and line."""
    res, width, height, aspect = base.res, base.width, base.height, base.aspect
    if entry.width is not None or entry.height is not None:  # the line's exact size wins over --aspect
        res, width, height, aspect = None, entry.width, entry.height, None
    elif entry.res is not None:
        res, width, height = entry.res, None, None
    req = replace(base, prompt=entry.prompt, res=res, width=width, height=height, aspect=aspect,
                  negative=entry.negative if entry.negative is not None else base.negative,
                  seed=entry.seed if entry.seed is not None else stage_seed(base_seed, index),
                  steps=entry.steps if entry.steps is not None else base.steps,
                  guidance=entry.guidance if entry.guidance is not None else base.guidance)
    try:
        return runner.plan_memory(runner.make_plan(req))
    except LinfusionError as exc:
        raise type(exc)(f"{entry.source}:{entry.line}: {exc}") from None


def _matches(path: Path, plan) -> bool:
    """--resume: the file exists and was made with the same parameters."""
    try:
        record = read_metadata(path).get("record") or {}
    except Exception:  # unreadable or foreign file: regenerate it
        return False
    want = {"prompt": plan.prompt, "negative": plan.negative, "seed": plan.seed, "width": plan.width,
            "height": plan.height, "steps": plan.stages[0].steps, "guidance": plan.stages[0].guidance,
            "model": plan.model}
    return all(record.get(k) == want[k] for k in _SAME)


def batch(
    file: Annotated[str, typer.Argument(help="Prompt file (text, JSON Lines or A1111 lines), or - for stdin.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Output directory.")] = ".",
    name: Template = None, resume: Annotated[bool, typer.Option("--resume", help="Skip entries already made with the same parameters.")] = False,
    res: Res = None, aspect: Aspect = None, width: Width = None, height: Height = None,
    model: Model = None, linfusion: Linfusion = None, no_linfusion: NoLinfusion = False,
    preset: PresetOpt = None, seed: Seed = None, steps: Steps = None, guidance: Guidance = None,
    negative: Negative = None, strengths: Strengths = None, scheduler: Scheduler = None,
    method: Method = None, max_vram: MaxVram = None, vae_tile: VaeTile = None, save_stages: SaveStages = False,
    format: Format = None, overwrite: Overwrite = False, json: Json = False, dry_run: DryRun = False,
    device: Device = None, dtype: Dtype = None, allow_pickle: AllowPickle = False, config: ModelConfig = None,
    quiet: Quiet = False, verbose: Verbose = False, lora: LoraOpt = None,
    controlnet: ControlNetOpt = None, control_image: ControlImage = None,
    control_scale: ControlScale = None, tile_controlnet: TileControlNet = None, tile_scale: TileScale = None,
    ip_adapter: IpAdapter = None, ip_image: IpImage = None, ip_scale: IpScale = None, ip_encoder: IpEncoder = None,
) -> None:
    """Generate every prompt of a file; the whole file is checked before anything runs."""
    entries = read_prompt_file(file, stdin=sys.stdin)
    if output == "-":
        raise InputError("batch writes files: -o must be a directory")
    base = request_from_options(
        "", preset=preset, res=res, aspect=aspect, width=width, height=height, model=model,
        linfusion=linfusion, no_linfusion=no_linfusion, seed=seed, steps=steps, guidance=guidance,
        negative=negative, strengths=strengths, scheduler=scheduler, max_vram=max_vram,
        vae_tile=vae_tile, save_stages=save_stages, device=device, dtype=dtype, loras=lora,
        controlnet=controlnet, control_image=control_image, control_scale=control_scale,
        tile_controlnet=tile_controlnet, tile_scale=tile_scale, ip_adapter=ip_adapter, ip_image=ip_image,
        ip_scale=ip_scale, ip_encoder=ip_encoder, method=method)
    base = replace(base, config=config, allow_pickle=allow_pickle, dry_run=dry_run)
    base_seed = base.seed if base.seed is not None else secrets.randbelow(SEED_MAX + 1)
    folder = output if output.endswith("/") else output + "/"
    jobs, seen = [], {}
    for index, entry in enumerate(entries):
        plan = _entry_plan(entry, index, base, base_seed)
        try:  # an entry's own output stays inside -o (links resolved)
            target = str(inside(folder, entry.output)) if entry.output is not None else folder
            path, fmt = common.resolve_target(target, plan=plan, fmt=format, template=name or BATCH_TEMPLATE,
                                              overwrite=overwrite or resume, index=index, create=False)
        except LinfusionError as exc:
            raise type(exc)(f"{entry.source}:{entry.line}: {exc}") from None
        key = os.path.realpath(path)  # x.png and sub/../x.png are one file
        if key in seen:
            raise OutputError(f"{entry.source}:{entry.line}: output {path} is also line {seen[key]}'s")
        seen[key] = entry.line
        if path.exists() and not overwrite and not (resume and _matches(path, plan)):
            raise OutputError(f"{entry.source}:{entry.line}: {path} exists with other parameters; "
                              "pass --overwrite")
        jobs.append((plan, path, fmt, entry))
    if jobs:  # room for every image of the batch, not just each one alone
        from ..targets import check_free_space, run_bound

        check_free_space(jobs[0][0], jobs[0][1], jobs[0][2], what=f"{len(jobs)} images",
                         need=sum(run_bound(plan, fmt) for plan, _, fmt, _ in jobs))
    if dry_run:
        for plan, path, _, _ in jobs:
            if not json:
                print(f"{path}:")
            common.print_dry_run(plan, as_json=json)
        return
    from ..targets import check_directory

    for _, path, _, _ in jobs:  # folders are made only once every check has passed
        check_directory(path.parent, create=True)
    loaded, failures = None, 0
    for k, (plan, path, fmt, entry) in enumerate(jobs, 1):
        if resume and path.exists() and _matches(path, plan):
            info(f"[{k}/{len(jobs)}] {path} already done", quiet=quiet)
            print(jsonlib.dumps({"path": str(path), "skipped": True}) if json else str(path), flush=True)
            continue
        if loaded is None:  # one model load serves every entry
            loaded = common.load(plan, verbose=verbose, quiet=quiet, allow_pickle=allow_pickle, config=config)
        info(f"[{k}/{len(jobs)}] {plan.prompt[:60]}", quiet=quiet)
        try:  # one entry's failure is reported and the others still run
            common.run_one(plan, loaded, path=path, fmt=fmt, overwrite=overwrite or resume, as_json=json,
                           quiet=quiet, verbose=verbose)
        except Exception as exc:  # noqa: BLE001 - every failure is one line; the exit code says it
            failures += 1
            error(f"{entry.source}:{entry.line}: {one_line_of(exc)}")
    if failures:
        raise typer.Exit(1)
