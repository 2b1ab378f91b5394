"""The library's front door: plan, generate and upscale from Python, without the CLI.

    from linfusion_cli import api
    plan = api.plan("a lighthouse at dusk", res=8192)      # frozen plan; nothing loads
    image, record = api.generate("a lighthouse at dusk", res=8192, model="demo")
    image, record = api.generate("a lighthouse", res=4096, pipe=my_pipe)   # your own pipeline
    bigger, record = api.upscale(Image.open("in.png"), "a lighthouse", res=8192)
    made = api.write_image(plan, api.load(plan), "out/")   # the CLI's checks, lock and resume
    jobs, manifest = api.plan_batch(entries, api.Request(prompt=""), "out/")  # checked, nothing run
    failures = api.run_batch(jobs, manifest, api.load)   # skips what is done, records what it makes

Options are Request's fields (declared in schema.OPTIONS: the flags of `linfusion generate`,
underscores for dashes). The CLI is a thin layer over plan_request, check_image or plan_batch
(jobs/: every output checked before the model loads), load, generate_file and run_batch.
"""

from __future__ import annotations

from PIL import Image
from dataclasses import replace
from pathlib import Path

import numpy as np

from .errors import NonFiniteError, OutOfMemoryError
from .planning.plan import GenerationPlan
from .planning.request import Request, plan_request as _plan_request
from .io import checkpoints, locks, outputs
from .io.targets import check_directory, make_directory, remove_if_empty
from .io.checkpoint_names import checkpoint_path, stage_path
from .io.checkpoints import pixels_digest
from .io import images
from .io.images import to_rgb8
from .models import loading
from .models.loading import prepare_model
from .models import taesd
from .models.resolve import info_of_pipeline
from .pipeline import run_plan, StageFinished, finite
from .jobs.claims import skip_reason
from .jobs.entries import plan_batch
from .jobs.job import Job, check_image
from .jobs.report import BatchReport
from .parallel import GroupError
from .parallel.world import World
from .tracing.ledger import ledger_for

__all__ = ["BatchReport", "Job", "Request", "check_image", "generate", "generate_file", "load", "plan",
           "plan_batch", "plan_request", "resume_start", "run_batch", "upscale", "write_image"]


def plan_request(req: Request, model_info=None) -> GenerationPlan:
    """The plan a run follows and a dry run prints; a CUDA plan's knobs ranked by predicted
    seconds from the cost ledger (tracing/ledger.py), each stage carrying its cost."""
    return _plan_request(req, model_info, ledger_for)


def plan(prompt: str, *, pipe=None, **options) -> GenerationPlan:
    """The plan for a prompt (memory planned per stage); `pipe`: plan for this open pipeline."""
    return plan_request(Request(prompt=prompt, **options), _info(pipe, options))


def load(plan: GenerationPlan, *, pipe=None, allow_pickle: bool = False, config: str | None = None):
    """The model a plan runs on: loaded from plan.model, or `pipe` made ready in place
    (dtypes, scheduler, LinFusion layers, adapters, device). Loaded weights go where the plan
    puts them: in host memory when every stage offloads them (loading_on_host)."""
    settings = dict(dtype=plan.dtype, device=plan.device, linfusion=plan.linfusion,
                    scheduler=plan.stages[0].scheduler, family=plan.family, adapters=plan.adapters)
    if pipe is not None:
        model = prepare_model(pipe, model=plan.model, **settings)
    else:
        model = loading.load_model(plan.model, allow_pickle=allow_pickle, config=config,
                                   on_host=loading_on_host(plan), **settings)
    if plan.preview is not None and plan.preview.method == "taesd":  # checked when planned
        model.preview_decoder = taesd.load_decoder(plan.preview.taesd, cache=loading.cache_dir(),
                                                   device=model.device, dtype=model.vae_dtype)
    return model


def loading_on_host(plan: GenerationPlan) -> bool:
    """Every stage's memory plan offloads the models: they need not go to the device at load."""
    return all(s.memory is not None and s.memory.offload != "none" for s in plan.stages)


def generate(prompt: str, *, pipe=None, on_event=None, **options):
    """(PIL image, run record) for a prompt: base stage then the img2img ladder."""
    return _run(plan(prompt, pipe=pipe, **options), pipe, options, on_event)


def upscale(image, prompt: str = "high detail", *, pipe=None, on_event=None, **options):
    """(PIL image, run record): the img2img ladder from an existing image (PIL or path)."""
    picture = images.open_image(image) if isinstance(image, (str, Path)) else to_rgb8(image)
    options.setdefault("init_image", str(image) if isinstance(image, (str, Path)) else "<image>")
    made = plan(prompt, pipe=pipe, init_size=picture.size, **options)
    return _run(made, pipe, options, on_event, init_image=np.asarray(picture))


def _info(pipe, options: dict):
    """The model as planning sees it: from `pipe` when given, else resolved by name later."""
    if pipe is None:
        return None

    return info_of_pipeline(pipe, options.get("model"))


def _run(made: GenerationPlan, pipe, options: dict, on_event, init_image=None):
    """Load (or prepare `pipe`) for the plan, run it; (PIL image, run record)."""
    model = load(made, pipe=pipe, allow_pickle=options.get("allow_pickle", False),
                 config=options.get("config"))
    image, record = run_plan(made, model, on_event=on_event or (lambda event: None),
                             init_image=init_image)
    return Image.fromarray(image), record


def result_summary(path: Path | None, record: dict) -> dict:
    """The --json object for one image: where it is and what made it."""
    return {
        "path": str(path) if path is not None else "-", "prompt": record["prompt"],
        "seed": record["seed"], "width": record["width"], "height": record["height"],
        "model": record["model"], "linfusion": record["linfusion"],
        "stages": [{"width": s["width"], "height": s["height"], "strength": s["strength"],
                    "steps": s["denoise_steps"], "seconds": s["seconds"], "peak_gib": s["peak_gib"]}
                   for s in record["stages"]],
    }


def stage_image_path(final: Path | None, index: int, width: int, height: int) -> Path:
    """Where --save-stages keeps stage `index`: beside the final file."""
    return stage_path(final, index, width, height)


def resume_start(plan: GenerationPlan, path: Path, init_image=None, notes: list | None = None,
                 load: bool = True):
    """Where generate_file(resume=True) would start: an io.checkpoints.Start after the last
    finished stage whose settings match and whose file is intact (pixels read and checked), or
    None (from the beginning); ResumeMismatchError when this output's checkpoints were all made
    with other settings. `notes` gets a line per checkpoint passed over; load=False reads the
    records only (a cheap check of whose checkpoints these are)."""
    return checkpoints.find_start(plan, path, _digest(init_image), notes=notes, load=load)


def _digest(init_image) -> str | None:
    return pixels_digest(np.asarray(init_image)) if init_image is not None else None


def generate_file(plan: GenerationPlan, model, *, path: Path | None, fmt: str, overwrite: bool = False,
                  on_event=None, init_image=None, resume: bool = False, write: bool = True,
                  faults=None, start=None, group=None, sync=None) -> dict:
    """Run a plan and write its image atomically (stdout when path is None).

    Every finished stage but the last is checkpointed beside `path` (io/checkpoints.py: hidden,
    or the --save-stages file), so a killed run loses at most one stage: resume=True starts
    after the last checkpoint whose settings match. The hidden checkpoints go once the image
    is written. write=False: run, write nothing (a band-parallel rank other than 0).
    faults: testhooks.OomFaults, the test hook's out-of-memory faults (counted across calls).
    start: the resume_start() a caller announced (resume=True): the run starts exactly there.
    group: the band-parallel group (parallel.BandGroup) this process makes the image with.
    sync: a launcher's ranks making this image together (jobs.agreement.StageSync): every rank
    says how each stage went and how the image went, so all fail together or go on together.
    """
    if sync is not None:
        return sync.image(lambda: generate_file(
            plan, model, path=path, fmt=fmt, overwrite=overwrite, on_event=sync.around(on_event),
            init_image=init_image, resume=resume, write=write, faults=faults, start=start, group=group))
    digest = _digest(init_image)
    if start is None and resume and path is not None:
        start = checkpoints.find_start(plan, path, digest)
    for part in start.found.float32 if start is not None else ():
        finite.widen(model, part)  # as the interrupted run had it after its NaN retry
    finished = []  # the last finished stage: kept if a later stage fails with NaN/inf

    def handle(event):
        if isinstance(event, StageFinished):
            finished[:] = [event]
            if write and event.stage < event.stages - 1 and (path is not None or plan.save_stages):
                stage = plan.stages[event.stage]
                mark = checkpoints.mark(plan, event.stage, event.image, digest, finite.widened(model, plan))
                kept = checkpoint_path(path, stage, plan.save_stages)
                images.save_image(event.image, kept,
                           record=event.record | {"checkpoint": mark}, fmt="png",
                           overwrite=overwrite or resume)
                if plan.save_stages:  # the visible stage file (a hidden checkpoint goes at the end)
                    event = replace(event, path=str(kept))
        if on_event is not None:
            on_event(event)

    try:
        image, record = run_plan(plan, model, on_event=handle, init_image=init_image, resume_from=start,
                                 previews=write, faults=faults, group=group)
    except (NonFiniteError, OutOfMemoryError) as exc:  # a later stage failed: keep the last finished
        if not finished or not write:
            raise
        last = finished[0]
        stage = plan.stages[last.stage]
        kept = checkpoints.reveal(path, stage) if path is not None and not plan.save_stages else None
        if kept is None:
            kept = stage_image_path(path, last.stage, stage.width, stage.height)
            if not kept.exists():
                images.save_image(last.image, kept, record=last.record, fmt="png", overwrite=overwrite)
        message = f"{exc}; stage {last.stage + 1}'s image is kept as {kept}"
        if isinstance(exc, NonFiniteError):
            raise NonFiniteError(exc.part, message) from None
        raise OutOfMemoryError(message) from None
    if not write:
        return result_summary(path, record)
    written = images.save_image(image, path, record=record, fmt=fmt, overwrite=overwrite)
    if path is not None:
        checkpoints.finish(plan, path, keep=plan.save_stages, init_digest=digest)
    return result_summary(written, record)


def write_image(plan: GenerationPlan, model, output: str | None, *, fmt: str | None = None,
                overwrite: bool = False, resume: bool = False, drawn: bool = False, init_image=None,
                on_event=None) -> dict:
    """generate_file behind the checks the CLI makes: the output, its stage files and preview
    (check_image: OutputError before anything runs), one run per output (its lock), and with
    resume the recorded seed (drawn: the plan's seed was drawn), a finished image left as it is
    ({"path", "skipped": True}) or the start after the last matching checkpoint."""
    job = check_image(plan, output, fmt=fmt, overwrite=overwrite, resume=resume, drawn=drawn,
                      init_image=init_image)
    if job.finished:
        return {"path": str(job.path), "skipped": True}
    if job.path is not None:
        check_directory(job.path.parent, create=True)
    with locks.output_lock(job.path):
        start = outputs.resume_plan(job.plan, job.path, init_image)[1] if resume and job.path else None
        return generate_file(job.plan, model, path=job.path, fmt=job.fmt, overwrite=overwrite,
                             on_event=on_event, init_image=init_image, resume=resume, start=start)


def run_batch(jobs: list[Job], manifest, load_model, *, world: World | None = None, together: bool = False,
              resume: bool = False, overwrite: bool = False, faults=None, group=None,
              sync=None, report: BatchReport | None = None) -> int:
    """Make this process's jobs (plan_batch's; this rank's share): make their folders, skip what
    the manifest proves done or another process holds, load the model once (load_model(plan)),
    make each and record it in the manifest at once. together: every job over every rank of
    `world` (band parallelism, `group` and `sync`: jobs.agreement.StageSync), rank 0 alone
    writing. A job that fails is reported and the others still run; returns how many failed.
    A run that stops (the model did not load, an interruption) takes away the folders it made
    while they are empty."""
    made = []
    try:
        for folder in dict.fromkeys([manifest.folder] + [job.path.parent for job in jobs]):
            made += make_directory(folder)  # checked by plan_batch; made only now
        return _run_jobs(jobs, manifest, load_model, world if world is not None else World(), together,
                         report if report is not None else BatchReport(), resume=resume, overwrite=overwrite,
                         faults=faults, group=group, sync=sync)
    except BaseException:
        remove_if_empty(made, manifest.path)  # a model that did not load leaves no empty folder
        raise


def _run_jobs(jobs: list[Job], manifest, load_model, world: World, together: bool, report: BatchReport,
              *, sync, **run) -> int:
    """run_batch's loop over the jobs, once their folders exist; returns how many failed."""
    lead = world.rank == 0 or not together  # the rank that writes files and records them
    loaded, made, failures = None, 0, 0
    for k, job in enumerate(jobs, 1):
        why = skip_reason(world, manifest, job, together)
        if why is not None:
            report.skipped(job, k, why)
            continue
        try:
            if loaded is None:  # one model load serves every job
                report.loading(job)
                loaded = load_model(job.plan)
            result = _made_in_batch(job, k, loaded, world if together else World(), report, write=lead,
                                    sync=sync if together else None, **run)
        except Exception as exc:  # noqa: BLE001 - reported; the other jobs still run
            if lead:
                manifest.release(job.index)
            if loaded is None or (together and isinstance(exc, GroupError)):  # no job can run
                raise
            failures += 1
            if lead:
                report.failed(job, exc)
            continue
        made += 1
        if lead:
            manifest.append(index=job.index, path=job.path, plan=job.plan, base_seed=job.base_seed,
                            rank=world.rank, world_size=world.size)
            manifest.release(job.index)
            report.made(job, result)
            world.finished(made)  # the test hook's count of images made
    return failures


def _made_in_batch(job: Job, k: int, model, team: World, report: BatchReport, *, resume: bool, write: bool,
                   **run) -> dict:
    """One job of run_batch: its resume start (rank 0's files decide for `team`), then its image."""
    result = error = None
    on_event = report.started(job, k)
    try:
        said, start = team.decide(lambda: outputs.resume_plan(job.plan, job.path)) if resume else ({}, None)
        for note in said.get("notes", ()):
            report.note(job, k, f"resume: {note}")
        result = generate_file(job.plan, model, path=job.path, fmt=job.fmt, on_event=on_event,
                               resume=resume and (write or start is not None), write=write, start=start, **run)
        return result
    except Exception as exc:
        error = exc
        raise
    finally:
        report.ended(job, k, result, error)
