"""One image's output files, checked before any model loads: the image, its stage checkpoints and
--save-stages files, its preview, a finished image --resume need not make again, and the seed an
interrupted run drew (recorded in its checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputError, ResumeMismatchError
from ..validate import SEED_MAX
from . import checkpoints, previews, weights_id
from .image_identity import same_settings
from .metadata import read_metadata
from .prompts import isatty
from .naming import DEFAULT_TEMPLATE, format_of, render_name, resolve_output
from .targets import check_free_space, check_target


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
            _check_hidden(plan, path, stage, overwrite=overwrite, resume=resume)
            if plan.save_stages:
                _check_visible(plan, path, stage, overwrite=overwrite, resume=resume)
    check_free_space(plan, path, fmt)


def _check_hidden(plan, path: Path, stage, *, overwrite: bool, resume: bool) -> None:
    """The stage's hidden checkpoint: free, this run's own (--resume) or replaceable (--overwrite)."""
    hidden = checkpoints.hidden_path(path, stage.index, stage.width, stage.height)
    check_target(hidden, overwrite=True)  # links, folders, FIFOs: never
    found = checkpoints.examine(hidden)
    if found is None or overwrite:
        return
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


def _check_visible(plan, path: Path, stage, *, overwrite: bool, resume: bool) -> None:
    """The stage's --save-stages file: free, this run's own (--resume) or replaceable (--overwrite)."""
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


def _in_the_way(where: Path, path: Path, stage, why: str) -> str:
    """The refusal for a file at the name a stage of `path` is kept under."""
    return (f"{where} is where stage {stage.index + 1} of {path.name} is kept, and {why}; move it "
            "away, or pass --overwrite to replace it")


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


def digest_of(init_image) -> str | None:
    """The input image's pixel digest, as checkpoints record it (None: no input image)."""
    return checkpoints.pixels_digest(np.asarray(init_image)) if init_image is not None else None


def resume_plan(plan, path, init_image=None) -> tuple[dict, object]:
    """Where --resume starts (JSON-safe) and the checked io.checkpoints.Start the run then uses
    (its pixels read now, so the point announced is the point used); the checkpoints passed
    over are noted in the dict's `notes`."""
    notes: list[str] = []
    start = checkpoints.find_start(plan, path, digest_of(init_image), notes=notes)
    return {"start_stage": 1 if start is None else start.stage + 2, "stages": len(plan.stages),
            "checkpoint": None if start is None else str(start.found.path),
            **({"notes": notes} if notes else {})}, start


def recorded_seed(plan, output, *, fmt, template=None, index=0, init_image=None):
    """The plan with the seed an interrupted run of this output recorded in its checkpoints
    (its file name may depend on the seed), or the plan as it is when none fits."""
    is_dir = output is None or output.endswith(("/", os.sep)) or Path(output).is_dir()
    folder = (Path(output) if output is not None else Path.cwd()) if is_dir else Path(output).parent
    digest = digest_of(init_image)
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


def finished(output, plan, *, fmt, drawn: bool) -> Path | None:
    """--resume of an image already made with these settings (and the seed it drew, when none
    was given, drawn=True): its path, or None when it is still to make."""
    if output == "-":
        return None
    try:
        path = resolve_output(output, template=DEFAULT_TEMPLATE, fmt=fmt, overwrite=True, create=False,
                              fields=dict(index=0, seed=plan.seed, prompt=plan.prompt, width=plan.width,
                                          height=plan.height))
        record = read_metadata(path).get("record") if path is not None and path.is_file() else None
    except Exception:  # noqa: BLE001 -- no readable image there: not finished (the checks say why)
        return None
    if drawn and isinstance(record, dict) and isinstance(record.get("seed"), int) \
            and not isinstance(record["seed"], bool) and 0 <= record["seed"] <= SEED_MAX:
        plan = plan.with_seed(record["seed"])
    if not isinstance(record, dict) or not same_settings(record, plan) \
            or any(isinstance(checkpoints.examine(p), checkpoints.Found) for _, p in checkpoints.paths_of(plan, path)
                   if p.name.startswith(".")):
        return None
    return path


def matches(path: Path, plan) -> bool:
    """--resume without a manifest line: the file's metadata shows the same settings (it is remade)."""
    try:
        record = read_metadata(path).get("record") or {}
    except Exception:  # noqa: BLE001 -- unreadable or foreign file: not ours to replace
        return False
    return same_settings(record, plan)


def what_differs(path: Path, plan) -> str:
    """'weights (the model weights ...)' when the image's record names other weights, else 'parameters'."""
    try:
        recorded = (read_metadata(path).get("record") or {}).get("weights")
    except Exception:  # noqa: BLE001 -- unreadable: its parameters are unknown
        return "parameters"
    names = weights_id.changed(weights_id.identity(plan), recorded) if isinstance(recorded, dict) else []
    return f"weights ({', '.join(names)})" if names else "parameters"


def check_stdout(output, stdout) -> None:
    """-o -: the image's bytes go to `stdout`, which must be open and not a terminal."""
    if output != "-":
        return
    try:
        os.fstat(stdout.fileno())
    except (AttributeError, OSError, ValueError):
        raise InputError("stdout is closed; use -o FILE") from None
    if isatty(stdout):
        raise InputError("refusing to write image bytes to a terminal; redirect stdout or use -o FILE")
