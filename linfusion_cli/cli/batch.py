"""`linfusion batch FILE|-`: many prompts, one model load, one stdout line per image."""

from __future__ import annotations

import json as jsonlib
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from .. import api, parallel, validate
from ..parallel.world import World, current, launched
from ..errors import InputError, LinfusionError, OutputError
from ..parallel import GroupError
from ..io.manifest import Manifest, check_manifest_path, same_settings
from ..io.metadata import read_metadata
from ..io.prompts import read_prompt_file
from ..io.targets import inside
from ..planning.plan import stage_seed
from ..schema import line_options
from ..validate import SEED_MAX
from . import common, ranks
from .console import error, event, info, one_line_of, progress_view, terminal_safe
from .options import GenerationOptions, Template, shared_options
from .. import testhooks
from ..inputs import expand
from ..io.checkpoints import any_in
from ..io import checkpoints, previews, weights_id
from ..io.targets import check_free_space, run_bound, make_directory, remove_if_empty

BATCH_TEMPLATE = "{index:04d}-{slug}.{ext}"  # no seed: --resume finds the same names again


def _entry_plan(entry, index, base: api.Request, base_seed: int):
    """The entry's own values over the command's; errors name the file and line."""
    given = {o.name: getattr(entry, o.name) for o in line_options() if getattr(entry, o.name) is not None}
    if entry.width is not None or entry.height is not None:  # the line's exact size wins over --aspect
        given.update(res=None, width=entry.width, height=entry.height, aspect=None)
    elif entry.res is not None:
        given.update(width=None, height=None)
    given.setdefault("seed", stage_seed(base_seed, index))
    req = replace(base, **given)
    try:
        return api.plan_request(req)
    except LinfusionError as exc:
        raise type(exc)(f"{entry.source}:{entry.line}: {exc}") from None


def _checkpoint_base_seed(entries, base, drawn: int, folder: str, name, format) -> int:
    """--resume when no entry finished: the batch seed an interrupted entry's checkpoints recorded
    (entry i's seed is the batch seed + i), else `drawn`."""
    if not any_in(Path(folder)):
        return drawn
    for index, entry in enumerate(entries):
        if entry.seed is not None:
            continue
        plan = _entry_plan(entry, index, base, drawn)
        target = str(inside(folder, entry.output)) if entry.output is not None else folder
        found = common.recorded_seed(plan, target, fmt=format, template=name or BATCH_TEMPLATE, index=index)
        if found.seed != plan.seed:
            return (found.seed - index) % (SEED_MAX + 1)
    return drawn


def _made_elsewhere(manifest, index, plan, path, *, drawn: bool) -> str | None:
    """Claim entry `index` for this process; why not (another process holds it or has finished
    it since this run's check), or None once it is ours to make."""
    if not manifest.claim(index):
        return "is being made by another process; left to it"
    record = manifest.refresh().records.get(index)
    if record is not None and record.matches(plan, manifest.relative(path), any_seed=drawn) \
            and record.intact(manifest.folder):
        manifest.release(index)
        return "was made by another process meanwhile"
    testhooks.claimed(index)
    return None


def _what_differs(path: Path, plan) -> str:
    """'weights (the model weights ...)' when the image's record names other weights, else 'parameters'."""
    try:
        recorded = (read_metadata(path).get("record") or {}).get("weights")
    except Exception:  # noqa: BLE001 -- unreadable: its parameters are unknown
        return "parameters"
    names = weights_id.changed(weights_id.identity(plan), recorded) if isinstance(recorded, dict) else []
    return f"weights ({', '.join(names)})" if names else "parameters"


def _matches(path: Path, plan) -> bool:
    """--resume without a manifest line: the file's metadata shows the same settings (it is remade)."""
    try:
        record = read_metadata(path).get("record") or {}
    except Exception:  # unreadable or foreign file: not ours to replace
        return False
    return same_settings(record, plan)


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
    if output == "-":
        raise InputError("batch writes files: -o must be a directory")
    base = _with_world(opts.request("", device=world.device(opts.device)), world, parallel)
    format, overwrite, json, dry_run = opts.format, opts.overwrite, opts.json, opts.dry_run
    quiet, verbose, allow_pickle, config = opts.quiet, opts.verbose, opts.allow_pickle, opts.config
    resume = opts.resume
    folder = output if output.endswith("/") else output + "/"
    manifest = Manifest(folder)
    check_manifest_path(manifest.path)  # written like an image: no link, folder or FIFO, up front
    if resume:
        manifest.load()
        if manifest.ignored:
            info(f"note: {manifest.ignored} damaged line{'s' if manifest.ignored > 1 else ''} of "
                 f"{manifest.path} ignored (those entries are made again)", quiet=quiet or world.rank != 0)
    # --resume without --seed reuses the batch seed the earlier run drew (every rank draws the same)
    base_seed = base.seed if base.seed is not None else (
        manifest.base_seed if manifest.base_seed is not None else world.seed)
    if resume and base.seed is None and manifest.base_seed is None:  # killed before any entry finished
        base_seed = _checkpoint_base_seed(entries, base, base_seed, folder, name, format)
    jobs = _checked_jobs(entries, base, base_seed, manifest, folder, name=name, format=format,
                         overwrite=overwrite, resume=resume, quiet=quiet or world.rank != 0)
    mine = jobs if together else [job for job in jobs if world.owns(job[0])]
    if mine:  # room for every image of this process's share, not just each one alone

        check_free_space(mine[0][1], mine[0][2], mine[0][3], what=f"{len(mine)} images",
                         need=sum(run_bound(job[1], job[3]) for job in mine))
    compared = {"parallel": parallel, "resume": resume, "overwrite": overwrite,  # rank 0's on every rank
                "dry_run": dry_run, "allow_pickle": allow_pickle, "config": config,
                "entries": [ranks.made(plan, path, together, format=fmt) for _, plan, path, fmt, *_ in jobs]}
    world.agree(keep=together, made=compared)  # every rank checked the whole file alike: all go, or all stop
    if dry_run:
        if world.rank != 0:
            return
        for index, plan, path, _, done, *_ in jobs:
            if not json:
                print(terminal_safe(f"{path}:"))
            start = common.resume_plan(plan, path)[0] if resume and done is None else None
            common.print_dry_run(plan, as_json=json, extra={"index": index, "path": str(path)}, resume=start)
        return

    made = []
    progress = opts.progress
    if progress == "json" and world.rank == 0 and not quiet:
        event("batch_start", entries=len(jobs), here=len(mine) if not together else len(jobs))
    try:
        for folder_path in dict.fromkeys([Path(folder)] + [job[2].parent for job in mine]):
            made += make_directory(folder_path)  # only once every check has passed
        device = jobs[0][1].device if jobs else "cpu"  # every entry plans the same device
        with common.band_group(world if together else World(), device):
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


PROGRESS_FROM = 2000  # entries: a file this long says how far its check has come


def _checked_jobs(entries, base, base_seed, manifest, folder, *, name, format, overwrite, resume, quiet):
    """Every entry planned and every path it writes checked (images, stage files, the manifest),
    for the whole file, before anything runs; errors name the file and line."""
    jobs, seen = [], {}
    manifest_key = os.path.realpath(manifest.path)
    seen[manifest_key] = None
    step = max(len(entries) // 10, 1) if len(entries) >= PROGRESS_FROM else 0
    for index, entry in enumerate(entries):
        if step and index and index % step == 0:
            info(f"checking {entries[0].source}: {index}/{len(entries)} entries", quiet=quiet)
        plan = _entry_plan(entry, index, base, base_seed)
        drawn = entry.seed is None and base.seed is None
        if drawn and (earlier := manifest.seed_for(index, plan)) is not None:
            plan = _entry_plan(entry, index, base, (earlier - index) % (SEED_MAX + 1))  # an earlier run's
        try:  # an entry's own output stays inside -o (links resolved)
            target = str(inside(folder, entry.output)) if entry.output is not None else folder
            path, fmt = common.resolve_target(target, plan=plan, fmt=format, template=name or BATCH_TEMPLATE,
                                              overwrite=overwrite or resume, index=index, create=False)
            if resume:  # checkpoints made with other settings: refused now, not halfway through
                api.resume_start(plan, path, load=False)
        except LinfusionError as exc:
            raise type(exc)(f"{entry.source}:{entry.line}: {exc}") from None
        written = [(path, "output")] + [  # stage files, and the hidden checkpoints a run leaves
            (p, "--save-stages file" if p.name[0] != "." else "stage checkpoint")
            for _, p in checkpoints.paths_of(plan, path) if plan.save_stages or p.name[0] == "."]
        if plan.preview is not None:  # the entry's own preview file: {index}/{name}, else -INDEX
            try:
                plan = replace(plan, preview=replace(plan.preview, path=previews.entry_path(
                    plan.preview.path, index=index, name=Path(path).stem)))
                common.check_preview(plan, path, overwrite=overwrite)
            except LinfusionError as exc:
                raise type(exc)(f"{entry.source}:{entry.line}: {exc}") from None
            written.append((Path(plan.preview.path), "--preview file"))
        for file, what in written:  # x.png and sub/../x.png are one file; so is a stage file of another line
            key = os.path.realpath(file)
            if key in seen:
                other = "the batch manifest" if seen[key] is None else f"line {seen[key][0]}'s {seen[key][1]}"
                raise OutputError(f"{entry.source}:{entry.line}: {what} {file} is also {other}")
            seen[key] = (entry.line, what)
        record = manifest.records.get(index)
        done = record if record is not None and record.matches(plan, manifest.relative(path)) else None
        if path.exists() and not overwrite and done is None and not (resume and _matches(path, plan)):
            raise OutputError(f"{entry.source}:{entry.line}: {path} exists with other "
                              f"{_what_differs(path, plan) if resume else 'parameters'}; pass --overwrite")
        jobs.append((index, plan, path, fmt, done, base_seed if drawn else None, entry))
    return jobs


def _with_world(base, world, parallel: str):
    """The batch's request for its world: --parallel bands plans each image over every rank (or,
    in a dry run without a launcher, over --world-size processes); images, one process each."""
    size = base.world_size or 1
    if parallel == "images":
        if size > 1:
            raise InputError("--world-size plans one image over several processes: with batch, "
                             "pass --parallel bands")
        return base
    if world.distributed:
        if base.world_size not in (None, world.size):
            raise InputError(f"--world-size {size} but the launcher started {world.size} processes")
        return replace(base, world_size=world.size)
    if size > 1 and not base.dry_run:
        raise InputError(f"--world-size {size} plans for {size} processes (with --dry-run); to run, "
                         f"start them: torchrun --nproc-per-node {size} -m linfusion_cli batch ...")
    return base


def _skip(world, manifest, index, plan, path, done, base_seed, together: bool):
    """Why entry `index` is not made here ("done", another process's words), or None to make it.
    together (every image over all ranks): rank 0 decides and claims, every rank follows."""
    if together and world.rank != 0:
        return world.broadcast(None)
    if done is not None and done.intact(manifest.folder):  # not truncated, replaced or gone
        why = "done"
    else:  # another process on this folder has it, or has just made it
        why = _made_elsewhere(manifest, index, plan, path, drawn=base_seed is not None)
    return world.broadcast(why) if together else why


def _resume_start(plan, path):
    """Where an entry's --resume starts (a checked io.checkpoints.Start, or None) and the
    checkpoints passed over (said before it runs, and the start used is this one)."""
    notes: list[str] = []
    return api.resume_start(plan, path, notes=notes), notes


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
    sync = ranks.StageSync(world)  # counts stages over the whole share (the test hook's N)
    for k, (index, plan, path, fmt, done, base_seed, entry) in enumerate(jobs, 1):
        why = _skip(world, manifest, index, plan, path, done, base_seed, together)
        if why is not None and progress == "json" and not quiet:
            event("skip", index=index, path=str(path), reason="done" if why == "done" else why)
        elif why == "done":
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
                loaded = common.rank0_first(lambda: common.load(
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
                    try:
                        start, notes = (team.decide(lambda: _resume_start(plan, path)) if resume
                                        else (None, []))
                        for note in notes if progress != "json" else ():
                            info(f"{who}[{k}/{len(jobs)}] resume: {note}", quiet=quiet)
                        result = api.generate_file(plan, loaded, path=path, fmt=fmt, overwrite=overwrite,
                                                   on_event=sync.around(view) if together else view,
                                                   resume=resume and (lead or start is not None),
                                                   write=lead, faults=faults, start=start,
                                                   group=parallel.active())
                    except Exception as exc:  # noqa: BLE001 -- every rank learns of it, then all raise
                        ranks.entry_end(team, exc)
                    ranks.entry_end(team, None)
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
                error(f"{entry.source}:{entry.line}: {one_line_of(exc)}")
            continue
        made += 1
        if not lead:
            continue
        manifest.append(index=index, path=path, plan=plan, base_seed=base_seed, rank=world.rank,
                        world_size=world.size)
        manifest.release(index)
        world.emit(jsonlib.dumps({**result, "index": index}) if as_json else result["path"])
        world.finished(made)
    return failures
