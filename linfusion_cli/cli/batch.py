"""`linfusion batch FILE|-`: many prompts, one model load, one stdout line per image."""

from __future__ import annotations

import json as jsonlib
import sys
from typing import Annotated

import typer

from .. import api, parallel, validate
from ..parallel.world import World, current, launched
from ..parallel import GroupError
from ..io.prompts import read_prompt_file
from ..jobs.claims import DONE, skip_reason
from ..jobs.processes import band_group, rank0_first
from . import common
from ..jobs import agreement
from .console import error, info, one_line_of, progress_view, terminal_safe
from ..progress_json import event
from .options import GenerationOptions, Template, shared_options
from ..inputs import expand
from ..io.outputs import resume_plan
from ..io.targets import check_free_space, run_bound, make_directory, remove_if_empty


@launched  # under torchrun / accelerate launch: this rank's share of the file
@shared_options
def batch(
    file: Annotated[str, typer.Argument(help="Prompt file (text, JSON Lines or A1111 lines), or - for stdin.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Output folder (default: the current one); file names from --name or a line's output; paths printed as given.")] = ".",
    name: Template = None,
    *, opts: GenerationOptions,
) -> None:
    """Generate every prompt of a file; the whole file is checked before anything runs."""
    world = current()
    parallel = validate.parallel(opts.parallel if opts.parallel is not None else "images")
    together = parallel == "bands" and world.distributed  # every image over every rank

    file, output = (file if file == "-" else expand(file)), expand(output)
    entries = read_prompt_file(file, stdin=world.stdin() if file == "-" else sys.stdin)
    format, overwrite, json, dry_run = opts.format, opts.overwrite, opts.json, opts.dry_run
    quiet, verbose, allow_pickle, config = opts.quiet, opts.verbose, opts.allow_pickle, opts.config
    resume = opts.resume
    jobs, manifest = api.plan_batch(entries, opts.request("", device=world.device(opts.device)), output,
                                    name=name, fmt=format, overwrite=overwrite, resume=resume, world=world,
                                    parallel_mode=parallel,
                                    note=lambda line: info(line, quiet=quiet or world.rank != 0))
    mine = jobs if together else [job for job in jobs if world.owns(job.index)]
    if mine:  # room for every image of this process's share, not just each one alone
        check_free_space(mine[0].plan, mine[0].path, mine[0].fmt, what=f"{len(mine)} images",
                         need=sum(run_bound(job.plan, job.fmt) for job in mine))
    compared = {"parallel": parallel, "resume": resume, "overwrite": overwrite,  # rank 0's on every rank
                "dry_run": dry_run, "allow_pickle": allow_pickle, "config": config,
                "entries": [agreement.made(job.plan, job.path, together, format=job.fmt) for job in jobs]}
    world.agree(keep=together, made=compared)  # every rank checked the whole file alike: all go, or all stop
    if dry_run:
        if world.rank != 0:
            return
        for job in jobs:
            if not json:
                print(terminal_safe(f"{job.path}:"))
            start = resume_plan(job.plan, job.path)[0] if resume and job.done is None else None
            common.print_dry_run(job.plan, as_json=json, extra={"index": job.index, "path": str(job.path)},
                                 resume=start)
        return

    made = []
    progress = opts.progress
    if progress == "json" and world.rank == 0 and not quiet:
        event("batch_start", entries=len(jobs), here=len(mine) if not together else len(jobs))
    try:
        for folder_path in dict.fromkeys([manifest.folder] + [job.path.parent for job in mine]):
            made += make_directory(folder_path)  # only once every check has passed
        device = jobs[0].plan.device if jobs else "cpu"  # every entry plans the same device
        with band_group(world if together else World(), device):
            failures = _run_share(world, mine, manifest, as_json=json, quiet=quiet, verbose=verbose,
                                  progress=progress,
                                  overwrite=overwrite or resume, allow_pickle=allow_pickle,
                                  config=config, resume=resume, together=together)
    except BaseException:
        manifest.close()
        remove_if_empty(made, manifest.path)  # a model that did not load leaves no empty folder
        raise
    finally:
        manifest.close()
    if progress == "json" and world.rank == 0 and not quiet:
        event("batch_end", failures=failures)
    if failures:
        raise typer.Exit(1)


def _run_share(world, jobs, manifest, *, as_json, quiet, verbose, overwrite, allow_pickle, config,
               resume=False, together=False, progress=None) -> int:
    """This rank's entries: skip what the manifest proves done, make the rest, record each at once.
    together: every entry over every rank (band parallelism); rank 0 alone writes and prints.

    One entry's failure is one line on stderr and the others still run; returns the failures.
    """
    loaded = None
    who = f"rank {world.rank}: " if world.distributed and not together else ""
    lead = world.rank == 0 or not together
    quiet = quiet or not lead or (progress == "json" and world.rank != 0)  # JSON: rank 0 reports
    made = failures = 0
    faults = common.oom_faults(world.rank)  # LINFUSION_TEST_OOM counts across the entries
    sync = agreement.StageSync(world)  # counts stages over the whole share (the test hook's N)
    for k, job in enumerate(jobs, 1):
        index, plan, path, fmt = job.index, job.plan, job.path, job.fmt
        why = skip_reason(world, manifest, job, together)
        if why is not None and progress == "json" and not quiet:
            event("skip", index=index, path=str(path), reason=why)
        elif why == DONE:
            info(f"{who}[{k}/{len(jobs)}] {path} already done", quiet=quiet)
            if lead:
                world.emit(jsonlib.dumps({"path": str(path), "index": index, "skipped": True})
                           if as_json else str(path))
            continue
        if why is not None:
            if progress != "json":
                info(f"{who}[{k}/{len(jobs)}] {path} {why}", quiet=quiet)
            if lead:
                world.emit(jsonlib.dumps({"path": str(path), "index": index, "skipped": True,
                                          "by": "another process"}) if as_json else str(path))
            continue
        try:
            if loaded is None:  # one model load serves every entry
                loaded = rank0_first(lambda: common.load(
                    plan, verbose=verbose, quiet=quiet, allow_pickle=allow_pickle, config=config,
                    progress=progress))
            if progress != "json":
                info(f"{who}[{k}/{len(jobs)}] {plan.prompt[:60]}", quiet=quiet)
            view = progress_view(progress, quiet=quiet, verbose=verbose)
            if progress != "json":
                view.live = view.live and not world.distributed  # ranks sharing a terminal: no live bars
            team = world if together else World()  # ranks that agree at each stage's end
            with view:
                view.run_started(plan, path, index)
                try:
                    said, start = team.decide(lambda: resume_plan(plan, path)) if resume else ({}, None)
                    for note in said.get("notes", ()) if progress != "json" else ():
                        info(f"{who}[{k}/{len(jobs)}] resume: {note}", quiet=quiet)
                    result = api.generate_file(plan, loaded, path=path, fmt=fmt, overwrite=overwrite,
                                               on_event=view, resume=resume and (lead or start is not None),
                                               write=lead, faults=faults, start=start,
                                               group=parallel.active(), sync=sync if together else None)
                except Exception as exc:  # noqa: BLE001 - reported below
                    view.run_finished(index=index, error=one_line_of(exc))
                    raise
                view.run_finished(result, index=index)
        except Exception as exc:  # noqa: BLE001 - every failure is one line; the exit code says it
            if lead:
                manifest.release(index)
            if loaded is None:  # the model itself did not load: nothing else can run
                raise
            if together and isinstance(exc, GroupError):  # the group is gone: no entry can run
                raise
            failures += 1
            if lead:
                error(f"{job.where}: {one_line_of(exc)}")
            continue
        made += 1
        if not lead:
            continue
        manifest.append(index=index, path=path, plan=plan, base_seed=job.base_seed, rank=world.rank,
                        world_size=world.size)
        manifest.release(index)
        world.emit(jsonlib.dumps({**result, "index": index}) if as_json else result["path"])
        world.finished(made)
    return failures
