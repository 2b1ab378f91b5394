"""Steps shared by generate, upscale and batch: plan, dry run, model load, one job's output."""

from __future__ import annotations

import contextlib
import json
import sys

from .. import api, testhooks
from ..parallel.world import current
from ..errors import InputError
from .console import info, one_line_of, progress_view, quiet_libraries, terminal_safe
from ..inputs import expand
from ..io import locks
from ..io.outputs import check_stdout, digest_of, resume_plan
from ..io.targets import check_directory
from ..jobs import agreement
from ..jobs.processes import band_group, for_world, rank0_first
from ..planning.plan_text import plan_lines, resume_text


def print_dry_run(plan, *, as_json: bool, extra: dict | None = None, resume: dict | None = None) -> None:
    """The plan on stdout: one JSON object (with `extra` first: a batch line's index and path),
    or a readable table; `resume`: where --resume starts."""
    if as_json:
        print(json.dumps({**(extra or {}), **plan.to_dict(), **({"resume": resume} if resume is not None else {})}))
        return
    for line in plan_lines(plan, resume):  # no control characters of a user's names reach the terminal
        print(terminal_safe(line))


def load(plan, *, verbose: bool, quiet: bool, allow_pickle: bool = False, config: str | None = None,
         progress: str | None = None):
    """The library's api.load, with the CLI's line (or JSON events) on stderr and the libraries'
    notices quieted."""
    view = progress_view(progress, quiet=quiet, verbose=verbose)
    view.loading(plan.model)
    quiet_libraries(verbose)
    model = api.load(plan, allow_pickle=allow_pickle, config=config)
    view.loaded()
    return model


def run_one(plan, model, *, path, fmt, overwrite, quiet, verbose, init_image=None, resume: bool = False,
            write: bool = True, progress: str | None = None, world, group=None, start=None) -> dict:
    """Generate one image and write it, its progress drawn (write=False: a band-parallel rank
    other than 0, which computes its share and writes nothing). world: the launcher's, whose
    ranks agree at each stage's end and at the image's; group: their band group; start: rank 0's
    resume start."""
    with progress_view(progress, quiet=quiet or not write, verbose=verbose) as view:
        view.run_started(plan, path)
        try:
            result = api.generate_file(plan, model, path=path, fmt=fmt, overwrite=overwrite, on_event=view,
                                       init_image=init_image, resume=resume, write=write, faults=testhooks.oom_faults(world.rank),
                                       start=start, group=group, sync=agreement.StageSync(world))
        except BaseException as exc:
            view.run_finished(error="interrupted" if isinstance(exc, KeyboardInterrupt) else one_line_of(exc))
            raise
        view.run_finished(result)
    return result


def plan_and_run(req, opts, *, output, init_image=None) -> None:
    """generate/upscale after parsing: plan, then print it (--dry-run) or run it to a file."""
    output = expand(output)
    world = current()
    drawn = req.seed is None  # a launcher's ranks share rank 0's draw (for_world)
    req = for_world(req, world)
    for flag, asked in (("--save-stages", req.save_stages), ("--resume", opts.resume)):
        if output == "-" and asked:
            raise InputError(f"{flag} works on files beside the image; it cannot be used with -o -")
    plan = api.plan_request(req)
    if not opts.dry_run:
        check_stdout(output, sys.stdout)
    # the output is checked as for a run; nothing is created before the model has loaded
    job = api.check_image(plan, output, fmt=opts.format, overwrite=opts.overwrite, resume=opts.resume,
                          drawn=drawn, init_image=init_image)
    plan, path, fmt = job.plan, job.path, job.fmt
    lead = world.rank == 0  # the one rank that writes files and prints
    if job.finished:  # generate --resume of a finished image: said as batch --resume says it
        if lead:
            info(f"{path} already done", quiet=opts.quiet)
            print(json.dumps({"path": str(path), "skipped": True}) if opts.json else str(path), flush=True)
        return
    # one run per output: where the folder exists the lock is taken now, before the resume point
    # is read, before the ranks agree (a held lock stops every rank with one line) and the load
    early = lead and not opts.dry_run and path is not None and path.parent.is_dir()
    with contextlib.ExitStack() as held:
        if early:
            held.enter_context(locks.output_lock(path))
        resume, start = resume_plan(plan, path, init_image) if opts.resume else (None, None)
        made = agreement.made(plan, path, format=fmt, resume=opts.resume, overwrite=opts.overwrite,
                          dry_run=opts.dry_run, allow_pickle=opts.allow_pickle, config=opts.config,
                          init_pixels=digest_of(init_image))
        world.agree(keep=True, made=made)  # every rank validated and plans rank 0's image, or all stop
        if opts.dry_run:
            if lead:
                print_dry_run(plan, as_json=opts.json,
                              extra={"path": str(path) if path is not None else "-"}, resume=resume)
            return
        found = start
        start = world.decide(lambda: found)  # under a launcher rank 0's files decide, pixels and all
        with band_group(world, plan.device) as group:
            loaded = rank0_first(lambda: load(plan, verbose=opts.verbose, quiet=opts.quiet or not lead,
                                              allow_pickle=opts.allow_pickle, config=opts.config,
                                              progress=opts.progress), world, group)
            if path is not None and lead:  # made only now: a model that fails to load leaves no folder
                check_directory(path.parent, create=True)
                if not early:
                    held.enter_context(locks.output_lock(path))
            for line in ([*(f"resume: {n}" for n in resume.get("notes", ())),
                          f"resume: {resume_text(resume)}"] if resume is not None else []):
                info(line, quiet=opts.quiet or not lead)
            result = run_one(plan, loaded, path=path, fmt=fmt, overwrite=opts.overwrite, quiet=opts.quiet,
                             verbose=opts.verbose, init_image=init_image,
                             resume=opts.resume and (lead or start is not None), write=lead,
                             progress=opts.progress, world=world, group=group, start=start)
            if lead and path is not None:
                print(json.dumps(result) if opts.json else result["path"], flush=True)
            elif lead and opts.json:
                info(json.dumps(result), quiet=False)  # stdout carries the image itself
