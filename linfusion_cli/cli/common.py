"""Steps shared by generate, upscale and batch: plan, dry run, model load, one job's output."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .. import api, parallel, testhooks
from ..parallel.world import World, current, launched
from ..errors import InputError, OutputError, ResumeMismatchError
from . import ranks
from .console import info, one_line_of, progress_view, quiet_libraries, terminal_safe
from ..adapters import describe
from ..inputs import expand
from ..io import checkpoints, locks, previews, weights_id
from ..io.manifest import same_settings
from ..io.metadata import read_metadata
from ..validate import SEED_MAX
from ..models.taesd import describe as taesd_words
from ..planning.memory.knob_table import words as knob_words
from ..planning.preview import shrink_note
from ..io.naming import DEFAULT_TEMPLATE, render_name, format_of, resolve_output
from ..io.targets import check_directory, check_free_space, check_target


def memory_line(stage) -> str:
    m = stage.memory
    if m is None:
        return ""
    knobs = [w + _vae_modes(m) if w.startswith("vae_tile=") else w for w in knob_words(asdict(m))]
    line = (f"~{m.estimated_peak_gib:.1f} GiB, host ~{m.estimated_host_gib:.1f} GiB "
            f"({', '.join(k for k in knobs if k)})")
    return line + (f", {cost_words(stage.cost)}" if stage.cost else "")


def cost_words(cost: dict) -> str:
    """A stage's predicted seconds and what crosses PCIe (and, over ranks, what one rank sends to
    its peers), for the dry run's stage line."""
    pcie = (cost["host_to_device_bytes"] + cost["device_to_host_bytes"]) / 1e9
    peers = f", to peers {cost['peer_bytes'] / 1e9:.1f} GB" if cost.get("peer_bytes") else ""
    return (f"predicted {cost['predicted_s']:.1f} s (compute {cost['compute_s']:.1f} s, "
            f"PCIe {pcie:.1f} GB{peers}, {cost['launches']} launches)")


def parallel_line(plan) -> str | None:
    """The dry run's line about band parallelism (None for one process)."""
    if plan.world_size <= 1:
        return None
    return (f"parallel: bands, world_size {plan.world_size}: every rank holds its band of rows "
            f"(GPU and host memory below are per rank; --max-vram is per GPU); a rank that waits "
            f"{plan.group_timeout_s:g} s for a peer stops the run (LINFUSION_GROUP_TIMEOUT)")


def _vae_modes(m) -> str:
    """' (decode exact, encode estimated; host 5.2 GiB)': the tiled VAE's planned statistics."""
    parts = [f"{part} {mode}" for part, mode in (("decode", m.vae_decode_mode), ("encode", m.vae_encode_mode))
             if mode]
    return f" ({', '.join(parts)}; host {m.vae_host_gib:.1f} GiB)" if parts else ""


def _safe_print(text: str = "") -> None:
    print(terminal_safe(text))


def print_dry_run(plan, *, as_json: bool, extra: dict | None = None, resume: dict | None = None) -> None:
    """The plan on stdout: one JSON object (with `extra` first: a batch line's index and path),
    or a readable table; `resume`: where --resume starts."""
    if as_json:
        print(json.dumps({**(extra or {}), **plan.to_dict(), **({"resume": resume} if resume is not None else {})}))
        return
    # the table echoes names and paths a user chose: no control characters reach the terminal
    _safe_print(planned_for(plan))
    if parallel_line(plan):
        _safe_print(parallel_line(plan))
    _safe_print(f"model {plan.model} ({plan.family}: {plan.family_from}), "
                f"preset {plan.preset}, LinFusion {plan.linfusion or 'off'}, seed {plan.seed}")

    for line in describe(plan.adapters):
        _safe_print(f"  {line}")
    if plan.method_from:
        _safe_print(f"  method: {plan.method_from}")
    for s in plan.stages:
        kind = "text-to-image" if s.strength is None else f"img2img @{s.strength}"
        if s.method == "sdedit":
            kind += " sdedit"
        elif s.method == "demofusion":
            d = s.demofusion
            kind += (f" demofusion (dilation x{d.dilation}, cosine {d.cosine_scale_1:g}/"
                     f"{d.cosine_scale_2:g}/{d.cosine_scale_3:g}, sigma {d.gaussian_sigma:g})")
        _safe_print(f"  stage {s.index + 1}: {s.width}x{s.height} {kind}, {s.denoise_steps} steps, "
                    f"seed {s.seed}, {memory_line(s)}")
    if plan.preview is not None:
        _safe_print(preview_line(plan))
    if resume is not None:
        for note in resume.get("notes", ()):
            _safe_print(f"resume: {note}")
        _safe_print(f"resume: {resume_text(resume)}")


def preview_line(plan) -> str:
    """The dry run's line about --preview: file, method, interval, size and bytes (in the stages'
    estimates above), and what the budget made smaller."""
    p = plan.preview
    method = p.method + (f" {taesd_words(p.taesd)}" if p.taesd is not None else "")
    if p.why:
        method += f" ({p.why})"
    every = f"every {p.every} steps" if p.every else "about 10 per stage"
    most = max((s.bytes for s in p.stages if s is not None), default=0)
    line = (f"preview: {p.path}, {method}, {every} and at each stage's end, long side <= {p.size} px, "
            f"~{most / 2 ** 20:.1f} MiB (in each stage's estimate)")
    note = shrink_note(p, plan.stages)
    return line + (f"; {note}" if note else "")


def check_preview(plan, path, *, overwrite: bool) -> None:
    """The preview file is none of the run's own images; another image under its name is
    replaced only with --overwrite."""
    if plan.preview is None:
        return
    taken = []
    if path is not None:
        taken = [path] + [p for s in plan.stages[:-1] for p in (
            checkpoints.hidden_path(path, s.index, s.width, s.height),
            checkpoints.stage_path(path, s.index, s.width, s.height))]
    previews.check_target(plan.preview.path, overwrite=overwrite, taken=taken)


def resume_plan(plan, path, init_image=None) -> tuple[dict, object]:
    """Where --resume starts (JSON-safe) and the checked io.checkpoints.Start the run then uses
    (its pixels read now, so the point announced is the point used); the checkpoints passed
    over are noted in the dict's `notes`."""
    notes: list[str] = []
    start = api.resume_start(plan, path, init_image, notes=notes)
    return {"start_stage": 1 if start is None else start.stage + 2, "stages": len(plan.stages),
            "checkpoint": None if start is None else str(start.found.path),
            **({"notes": notes} if notes else {})}, start


def resume_text(resume: dict) -> str:
    """The dry run's and the run's one line about --resume."""
    if resume["checkpoint"] is None:
        return f"no checkpoint; starts at stage 1 of {resume['stages']}"
    return (f"starts at stage {resume['start_stage']} of {resume['stages']} from "
            f"{resume['checkpoint']}")


def planned_for(plan) -> str:
    """The dry run's first line: the device, dtypes and budget the estimates are for."""
    budget = (plan.budget.describe() if plan.budget is not None
              else "no budget given (the fastest plan; pass --max-vram)")
    where = " (no GPU on this machine: planned for one)" if plan.planned_elsewhere else ""
    priced = (f"; priced for {plan.gpu}: predicted {plan.predicted_s:.1f} s in all (not measured)"
              if plan.predicted_s is not None else
              "; not priced (--gpu NAME gives predicted seconds)" if plan.planned_elsewhere else "")
    return (f"planned for {plan.device}{where}, {budget}, UNet {plan.dtype}, VAE {plan.vae_dtype}"
            f"{priced}")


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


def oom_faults(rank: int | None = None):
    """LINFUSION_TEST_OOM's faults for this process (None unless LINFUSION_TEST_HOOKS=1): `rank`,
    else the band-parallel group's rank, else 0."""
    if rank is None:
        group = parallel.active()
        rank = group.rank if group is not None else 0
    return testhooks.oom_faults(rank)


def run_one(plan, model, *, path, fmt, overwrite, as_json, quiet, verbose, init_image=None,
            resume: bool = False, write: bool = True, progress: str | None = None,
            world=None, start=None) -> dict:
    """Generate one image, write it, print its path (or JSON) on stdout (write=False: a band-
    parallel rank other than 0, which computes its share and writes and prints nothing).
    world: the launcher's, whose ranks agree at each stage's end and at the image's; start:
    rank 0's resume start."""
    world = world if world is not None else World()
    with progress_view(progress, quiet=quiet or not write, verbose=verbose) as view:
        view.run_started(plan, path)
        try:
            try:
                result = api.generate_file(plan, model, path=path, fmt=fmt, overwrite=overwrite,
                                           on_event=ranks.StageSync(world).around(view),
                                           init_image=init_image, resume=resume, write=write,
                                           faults=oom_faults(), start=start,
                                           group=parallel.active())
            except Exception as exc:  # noqa: BLE001 -- every rank learns of it, then all raise
                ranks.entry_end(world, exc)
            ranks.entry_end(world, None)
        except BaseException as exc:
            view.run_finished(error="interrupted" if isinstance(exc, KeyboardInterrupt) else one_line_of(exc))
            raise
        view.run_finished(result)
    if not write:
        return result
    if path is not None:
        print(json.dumps(result) if as_json else result["path"], flush=True)
    elif as_json:
        info(json.dumps(result), quiet=False)  # stdout carries the image itself
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
    if opts.resume and drawn:  # the seed the interrupted run drew, from its checkpoints
        plan = recorded_seed(plan, output, fmt=opts.format, init_image=init_image)
    if not opts.dry_run:
        not_both_json_and_stdout(output, opts.json)
    # the output is checked as for a run; nothing is created before the model has loaded
    if opts.resume and finished(output, plan, fmt=opts.format, opts=opts, world=world, drawn=drawn):
        return
    path, fmt = resolve_target(output, plan=plan, fmt=opts.format, overwrite=opts.overwrite,
                               resume=opts.resume, create=False)
    check_preview(plan, path, overwrite=opts.overwrite)
    lead = world.rank == 0  # the one rank that writes files and prints
    # one run per output: where the folder exists the lock is taken now, before the resume point
    # is read, before the ranks agree (a held lock stops every rank with one line) and the load
    early = lead and not opts.dry_run and path is not None and path.parent.is_dir()
    with contextlib.ExitStack() as held:
        if early:
            held.enter_context(locks.output_lock(path))
        resume, start = resume_plan(plan, path, init_image) if opts.resume else (None, None)
        made = ranks.made(plan, path, format=fmt, resume=opts.resume, overwrite=opts.overwrite,
                          dry_run=opts.dry_run, allow_pickle=opts.allow_pickle, config=opts.config,
                          init_pixels=checkpoints.pixels_digest(init_image) if init_image is not None else None)
        world.agree(keep=True, made=made)  # every rank validated and plans rank 0's image, or all stop
        if opts.dry_run:
            if lead:
                print_dry_run(plan, as_json=opts.json,
                              extra={"path": str(path) if path is not None else "-"}, resume=resume)
            return
        found = start
        start = world.decide(lambda: found)  # under a launcher rank 0's files decide, pixels and all
        with band_group(world, plan.device):
            loaded = rank0_first(lambda: load(plan, verbose=opts.verbose, quiet=opts.quiet or not lead,
                                              allow_pickle=opts.allow_pickle, config=opts.config,
                                              progress=opts.progress))
            if path is not None and lead:  # made only now: a model that fails to load leaves no folder
                check_directory(path.parent, create=True)
                if not early:
                    held.enter_context(locks.output_lock(path))
            if resume is not None:
                for note in resume.get("notes", ()):
                    info(f"resume: {note}", quiet=opts.quiet or not lead)
                info(f"resume: {resume_text(resume)}", quiet=opts.quiet or not lead)
            run_one(plan, loaded, path=path, fmt=fmt, overwrite=opts.overwrite, as_json=opts.json,
                    quiet=opts.quiet, verbose=opts.verbose, init_image=init_image,
                    resume=opts.resume and (lead or start is not None), write=lead,
                    progress=opts.progress, world=world, start=start)


def for_world(req, world):
    """The request as the launcher's processes run it: over all of them (band parallelism), one
    seed (rank 0's draw) and each rank's own device; --world-size alone plans (--dry-run) only."""
    if not world.distributed:
        if (req.world_size or 1) > 1 and not req.dry_run:
            raise InputError(f"--world-size {req.world_size} plans for {req.world_size} processes "
                             "(with --dry-run); to run, start them: torchrun --nproc-per-node "
                             f"{req.world_size} -m linfusion_cli ...")
        return req
    if req.world_size not in (None, world.size):
        raise InputError(f"--world-size {req.world_size} but the launcher started {world.size} "
                         "processes (WORLD_SIZE)")
    return replace(req, world_size=world.size, seed=req.seed if req.seed is not None else world.seed,
                   device=world.device(req.device))


@contextlib.contextmanager
def band_group(world, device: str):
    """Under a launcher, the band-parallel group every rank computes the image with, its tensors
    on `device` (the plan's: this rank's GPU, or the CPU)."""
    if not world.distributed:
        yield None
        return
    with parallel.band_parallel(world.rank, world.size, torch.device(device)) as group:
        yield group


def rank0_first(load_model):
    """load_model() on rank 0 first, then on the other ranks of the band group (World.in_turn):
    a demo model is built and a download made once, then read from the cache."""
    if parallel.active() is None:
        return load_model()
    return current().in_turn(load_model)


def shared_prompt(prompt: str | None) -> str:
    """read_prompt_argument; under a launcher, rank 0 reads stdin and every rank gets its text."""
    world = current()
    if not world.distributed:
        return read_prompt_argument(prompt)
    text, problem = None, None
    if world.rank == 0:
        try:
            text = read_prompt_argument(prompt)
        except InputError as exc:  # every rank must reach the broadcast
            problem = str(exc)
    text, problem = world.share((text, problem))
    if problem is not None:
        raise InputError(problem)
    return text


def recorded_seed(plan, output, *, fmt, template=None, index=0, init_image=None):
    """The plan with the seed an interrupted run of this output recorded in its checkpoints
    (its file name may depend on the seed), or the plan as it is when none fits."""

    is_dir = output is None or output.endswith(("/", os.sep)) or Path(output).is_dir()
    folder = (Path(output) if output is not None else Path.cwd()) if is_dir else Path(output).parent
    digest = checkpoints.pixels_digest(init_image) if init_image is not None else None
    for seed in checkpoints.recorded_seeds(plan, folder, digest):
        candidate = plan.with_seed(seed)
        path = Path(output) if not is_dir else folder / render_name(
            template or DEFAULT_TEMPLATE, index=index, seed=seed, prompt=plan.prompt, width=plan.width,
            height=plan.height, ext=format_of(None, fmt))
        try:
            if checkpoints.find_start(candidate, path, digest, load=False) is not None:
                return candidate
        except ResumeMismatchError:
            continue
    return plan


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
                   create=True, resume: bool = False) -> tuple[Path | None, str]:
    """Output path (None for stdout) and format, checked before any heavy work."""
    fields = dict(index=index, seed=plan.seed, prompt=plan.prompt, width=plan.width, height=plan.height)
    path = resolve_output(output, template=template or DEFAULT_TEMPLATE, fields=fields, fmt=fmt,
                          overwrite=overwrite, create=create)
    fmt = format_of(path, fmt)
    check_outputs(plan, path, fmt, overwrite=overwrite, resume=resume)
    return path, fmt


def check_outputs(plan, path, fmt, *, overwrite, resume: bool = False) -> None:
    """Before any model loads: stage checkpoints and --save-stages files free (or replaceable:
    --overwrite, or --resume for this run's own checkpoints), room on the disk."""
    if path is not None:
        for stage in plan.stages[:-1]:
            hidden = checkpoints.hidden_path(path, stage.index, stage.width, stage.height)
            check_target(hidden, overwrite=True)  # links, folders, FIFOs: never
            found = checkpoints.examine(hidden)
            if found is not None and not overwrite:
                if not isinstance(found, checkpoints.Unusable):
                    if not resume:
                        raise OutputError(f"{hidden} is a checkpoint of an unfinished run of {path.name}; "
                                          "pass --resume to continue it, or --overwrite to start over")
                elif found.ours:  # --resume goes on from the last valid stage and remakes this one
                    if not resume:
                        raise OutputError(f"{hidden} is a checkpoint of an unfinished run of {path.name}, "
                                          f"but {found.why}; pass --resume to go on from the last valid "
                                          "stage, or --overwrite to start over")
                else:
                    raise OutputError(_in_the_way(hidden, path, stage, found.why))
            if plan.save_stages:
                visible = checkpoints.stage_path(path, stage.index, stage.width, stage.height)
                check_target(visible, overwrite=True)
                found = checkpoints.examine(visible)
                ours = isinstance(found, checkpoints.Unusable) and found.ours or (
                    isinstance(found, checkpoints.Found)  # another run's stage file is never replaced
                    and weights_id.same(checkpoints.settings(plan, stage.index, found.settings.get("init_image")),
                                        found.settings))
                if found is not None and not overwrite and not (resume and ours):
                    if ours:
                        raise OutputError(f"{visible} is a stage file of an unfinished run of {path.name}; "
                                          "pass --resume to continue it, or --overwrite to start over")
                    what = found.why if isinstance(found, checkpoints.Unusable) else "it was made with other settings"
                    raise OutputError(_in_the_way(visible, path, stage, what))
    check_free_space(plan, path, fmt)


def _in_the_way(where: Path, path: Path, stage, why: str) -> str:
    """The refusal for a file at the name a stage of `path` is kept under."""
    return (f"{where} is where stage {stage.index + 1} of {path.name} is kept, and {why}; move it "
            "away, or pass --overwrite to replace it")


def finished(output, plan, *, fmt, opts, world, drawn: bool) -> bool:
    """generate --resume of an image already made with these settings (and the seed it drew,
    when none was given): "already done" on stderr, its path (or JSON) on stdout, as batch
    --resume says of a finished entry."""
    if output == "-":
        return False
    try:
        path = resolve_output(output, template=DEFAULT_TEMPLATE, fmt=fmt, overwrite=True, create=False,
                              fields=dict(index=0, seed=plan.seed, prompt=plan.prompt, width=plan.width,
                                          height=plan.height))
        record = read_metadata(path).get("record") if path is not None and path.is_file() else None
    except Exception:  # noqa: BLE001 -- no readable image there: not finished (the checks below say why)
        return False
    if drawn and isinstance(record, dict) and isinstance(record.get("seed"), int) \
            and not isinstance(record["seed"], bool) and 0 <= record["seed"] <= SEED_MAX:
        plan = plan.with_seed(record["seed"])
    if not isinstance(record, dict) or not same_settings(record, plan) \
            or any(isinstance(checkpoints.examine(p), checkpoints.Found) for _, p in checkpoints.paths_of(plan, path)
                   if p.name.startswith(".")):
        return False
    if world.rank == 0:
        info(f"{path} already done", quiet=opts.quiet)
        print(json.dumps({"path": str(path), "skipped": True}) if opts.json else str(path), flush=True)
    return True


def not_both_json_and_stdout(output, as_json) -> None:
    if output == "-" and not _open_stream(sys.stdout):
        raise InputError("stdout is closed; use -o FILE")
    if output == "-" and _isatty(sys.stdout):
        raise InputError("refusing to write image bytes to a terminal; redirect stdout or use -o FILE")
