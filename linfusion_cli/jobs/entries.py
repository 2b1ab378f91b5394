"""A batch file's entries as Jobs: each planned (its own values over the command's), every path
it writes checked against the others and the folder, for the whole file before anything runs."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from ..parallel.world import World
from ..errors import InputError, LinfusionError, OutputError
from ..io import checkpoints, outputs, previews
from ..io.checkpoints import any_in
from ..io.manifest import Manifest, check_manifest_path
from ..io.targets import inside
from ..planning.plan import stage_seed
from ..planning.option_classes import Request
from ..planning.request import plan_request
from ..schema import line_options
from ..tracing.ledger import ledger_for
from ..validate import SEED_MAX
from .job import Job
from .processes import batch_for_world

BATCH_TEMPLATE = "{index:04d}-{slug}.{ext}"  # no seed: --resume finds the same names again
PROGRESS_FROM = 2000  # entries: a file this long says how far its check has come


def plan_batch(entries, base: Request, output: str, *, name: str | None = None, fmt: str | None = None,
               overwrite: bool = False, resume: bool = False, world=None, parallel_mode: str = "images",
               note=None) -> tuple[list[Job], Manifest]:
    """Every entry's Job and the folder's manifest (loaded with resume), or the first error, named
    by its file and line: two entries writing one file, an output in the way, checkpoints of other
    settings. world: the launcher's (its seed is the batch's when none is given); note(line):
    where a long check has come, damaged manifest lines ignored."""
    world = world if world is not None else World()
    note = note or (lambda line: None)
    if output == "-":
        raise InputError("batch writes files: -o must be a directory")
    base = batch_for_world(base, world, parallel_mode)
    folder = output if output.endswith("/") else output + "/"
    manifest = Manifest(folder)
    check_manifest_path(manifest.path)  # written like an image: no link, folder or FIFO, up front
    if resume:
        manifest.load()
        if manifest.ignored:
            note(f"note: {manifest.ignored} damaged line{'s' if manifest.ignored > 1 else ''} of "
                 f"{manifest.path} ignored (those entries are made again)")
    # --resume without --seed reuses the batch seed the earlier run drew (every rank draws the same)
    base_seed = base.seed if base.seed is not None else (
        manifest.base_seed if manifest.base_seed is not None else world.seed)
    if resume and base.seed is None and manifest.base_seed is None:  # killed before any entry finished
        base_seed = checkpoint_base_seed(entries, base, base_seed, folder, name, fmt)
    jobs = checked_jobs(entries, base, base_seed, manifest, folder, name=name, fmt=fmt,
                        overwrite=overwrite, resume=resume, note=note)
    return jobs, manifest


def entry_plan(entry, index: int, base: Request, base_seed: int):
    """The entry's own values over the command's; errors name the file and line."""
    given = {o.name: getattr(entry, o.name) for o in line_options() if getattr(entry, o.name) is not None}
    if entry.width is not None or entry.height is not None:  # the line's exact size wins over --aspect
        given.update(res=None, width=entry.width, height=entry.height, aspect=None)
    elif entry.res is not None:
        given.update(width=None, height=None)
    given.setdefault("seed", stage_seed(base_seed, index))
    req = replace(base, **given)
    try:
        return plan_request(req, None, ledger_for)
    except LinfusionError as exc:
        raise type(exc)(f"{entry.source}:{entry.line}: {exc}") from None


def checkpoint_base_seed(entries, base: Request, drawn: int, folder: str, name, fmt) -> int:
    """--resume when no entry finished: the batch seed an interrupted entry's checkpoints recorded
    (entry i's seed is the batch seed + i), else `drawn`."""
    if not any_in(Path(folder)):
        return drawn
    for index, entry in enumerate(entries):
        if entry.seed is not None:
            continue
        plan = entry_plan(entry, index, base, drawn)
        target = str(inside(folder, entry.output)) if entry.output is not None else folder
        found = outputs.recorded_seed(plan, target, fmt=fmt, template=name or BATCH_TEMPLATE, index=index)
        if found.seed != plan.seed:
            return (found.seed - index) % (SEED_MAX + 1)
    return drawn


def checked_jobs(entries, base: Request, base_seed: int, manifest: Manifest, folder: str, *, name, fmt,
                 overwrite: bool, resume: bool, note) -> list[Job]:
    """Every entry planned and every path it writes checked (images, stage files, the manifest),
    for the whole file, before anything runs; errors name the file and line."""
    jobs, seen = [], {os.path.realpath(manifest.path): None}
    step = max(len(entries) // 10, 1) if len(entries) >= PROGRESS_FROM else 0
    for index, entry in enumerate(entries):
        if step and index and index % step == 0:
            note(f"checking {entries[0].source}: {index}/{len(entries)} entries")
        plan = entry_plan(entry, index, base, base_seed)
        drawn = entry.seed is None and base.seed is None
        if drawn and (earlier := manifest.seed_for(index, plan)) is not None:
            plan = entry_plan(entry, index, base, (earlier - index) % (SEED_MAX + 1))  # an earlier run's
        where = f"{entry.source}:{entry.line}"
        try:  # an entry's own output stays inside -o (links resolved)
            target = str(inside(folder, entry.output)) if entry.output is not None else folder
            path, fmt_of = outputs.resolve_target(target, plan=plan, fmt=fmt, template=name or BATCH_TEMPLATE,
                                                  overwrite=overwrite or resume, index=index, create=False)
            if resume:  # checkpoints made with other settings: refused now, not halfway through
                checkpoints.find_start(plan, path, load=False)
            if plan.preview is not None:  # the entry's own preview file: {index}/{name}, else -INDEX
                plan = replace(plan, preview=replace(plan.preview, path=previews.entry_path(
                    plan.preview.path, index=index, name=Path(path).stem)))
                outputs.check_preview(plan, path, overwrite=overwrite)
        except LinfusionError as exc:
            raise type(exc)(f"{where}: {exc}") from None
        _claim_paths(seen, entry, plan, path)
        record = manifest.records.get(index)
        done = record if record is not None and record.matches(plan, manifest.relative(path)) else None
        if path.exists() and not overwrite and done is None and not (resume and outputs.matches(path, plan)):
            differs = outputs.what_differs(path, plan) if resume else "parameters"
            raise OutputError(f"{where}: {path} exists with other {differs}; pass --overwrite")
        jobs.append(Job(index=index, plan=plan, path=path, fmt=fmt_of, done=done,
                        base_seed=base_seed if drawn else None, entry=entry))
    return jobs


def _claim_paths(seen: dict, entry, plan, path: Path) -> None:
    """Record every file the entry writes in `seen`; OutputError when one is another's already
    (x.png and sub/../x.png are one file; so is a stage file of another line)."""
    written = [(path, "output")] + [  # stage files, and the hidden checkpoints a run leaves
        (p, "--save-stages file" if p.name[0] != "." else "stage checkpoint")
        for _, p in checkpoints.paths_of(plan, path) if plan.save_stages or p.name[0] == "."]
    if plan.preview is not None:
        written.append((Path(plan.preview.path), "--preview file"))
    for file, what in written:
        key = os.path.realpath(file)
        if key in seen:
            other = "the batch manifest" if seen[key] is None else f"line {seen[key][0]}'s {seen[key][1]}"
            raise OutputError(f"{entry.source}:{entry.line}: {what} {file} is also {other}")
        seen[key] = (entry.line, what)

