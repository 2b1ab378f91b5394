"""`linfusion batch FILE|-`: many prompts, one model load, one stdout line per image."""

from __future__ import annotations

import contextlib
import json as jsonlib
import sys
from typing import Annotated

import typer

from .. import api, testhooks, validate
from ..parallel.world import World, current, launched
from ..io.prompts import read_prompt_file
from ..jobs.claims import DONE
from ..jobs.processes import band_group, rank0_first
from . import runs
from ..jobs import agreement
from .console import error as error_line, info, one_line_of, progress_view, terminal_safe
from ..progress_json import event
from .options import GenerationOptions, Template, shared_options
from ..inputs import expand
from ..io.outputs import resume_plan
from ..io.targets import check_free_space, run_bound


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
            runs.print_dry_run(job.plan, as_json=json, extra={"index": job.index, "path": str(job.path)},
                                 resume=start)
        return

    progress = opts.progress
    if progress == "json" and world.rank == 0 and not quiet:
        event("batch_start", entries=len(jobs), here=len(mine) if not together else len(jobs))
    try:
        device = jobs[0].plan.device if jobs else "cpu"  # every entry plans the same device
        with band_group(world if together else World(), device) as group:
            failures = _run_share(world, group, mine, manifest, as_json=json, quiet=quiet, verbose=verbose,
                                  progress=progress,
                                  overwrite=overwrite or resume, allow_pickle=allow_pickle,
                                  config=config, resume=resume, together=together)
    finally:
        manifest.close()
    if progress == "json" and world.rank == 0 and not quiet:
        event("batch_end", failures=failures)
    if failures:
        raise typer.Exit(1)


def _run_share(world, group, jobs, manifest, *, as_json, quiet, verbose, overwrite, allow_pickle, config,
               resume=False, together=False, progress=None) -> int:
    """This rank's entries made by api.run_batch, drawn and printed by _Lines; returns the failures.
    together: every entry over every rank (band parallelism); rank 0 alone writes and prints."""
    quiet = quiet or not (world.rank == 0 or not together) or (progress == "json" and world.rank != 0)
    load = lambda plan: rank0_first(lambda: runs.load(  # noqa: E731 - one line
        plan, verbose=verbose, quiet=quiet, allow_pickle=allow_pickle, config=config, progress=progress),
        world, group)
    return api.run_batch(jobs, manifest, load, world=world, together=together, resume=resume,
                         overwrite=overwrite, faults=testhooks.oom_faults(world.rank),  # counted over the entries
                         group=group, sync=agreement.StageSync(world),  # stages counted over them too
                         report=_Lines(world, len(jobs), as_json=as_json, quiet=quiet, verbose=verbose,
                                       progress=progress, lead=world.rank == 0 or not together,
                                       who=f"rank {world.rank}: " if world.distributed and not together else ""))


class _Lines(api.BatchReport):
    """A batch's lines: progress on stderr (bars, JSON events or messages), a path or JSON per image on
    stdout from the writing rank, one error line per failed entry."""

    def __init__(self, world, count, *, as_json, quiet, verbose, progress, lead, who):
        self.world, self.count, self.as_json, self.quiet, self.verbose = world, count, as_json, quiet, verbose
        self.progress, self.lead, self.who, self.view = progress, lead, who, None
        self.drawing = contextlib.ExitStack()  # the view of the job under way, closed when it ends

    def _say(self, k, text):
        if self.progress != "json":
            info(f"{self.who}[{k}/{self.count}] {text}", quiet=self.quiet)

    def skipped(self, job, k, why):
        if self.progress == "json" and not self.quiet:
            event("skip", index=job.index, path=str(job.path), reason=why)
        self._say(k, f"{job.path} {'already done' if why == DONE else why}")
        if self.lead:
            line = {"path": str(job.path), "index": job.index, "skipped": True}
            self.world.emit(jsonlib.dumps(line if why == DONE else {**line, "by": "another process"})
                            if self.as_json else str(job.path))

    def started(self, job, k):
        self._say(k, job.plan.prompt[:60])
        self.view = progress_view(self.progress, quiet=self.quiet, verbose=self.verbose)
        if self.progress != "json":
            self.view.live = self.view.live and not self.world.distributed  # ranks sharing a terminal
        self.drawing.enter_context(self.view)
        self.view.run_started(job.plan, job.path, job.index)
        return self.view

    def note(self, job, k, line):
        self._say(k, line)

    def ended(self, job, k, result, error):
        failed = "interrupted" if result is None and error is None else one_line_of(error) if error else None
        self.view.run_finished(result, index=job.index, error=failed)
        self.drawing.close()

    def made(self, job, result):
        self.world.emit(jsonlib.dumps({**result, "index": job.index}) if self.as_json else result["path"])

    def failed(self, job, error):
        error_line(f"{job.where}: {one_line_of(error)}")
