"""Stage checkpoints: every finished stage's image beside the output, so a killed run can resume.

Stage k of `out/x.png` is kept as `out/.x.png.stageK-WxH.png` (hidden), or as the
`--save-stages` file `out/x.png.stageK-WxH.png` when stages are kept: one file serves both
(checkpoint_names.py). It is a PNG (exact uint8 pixels: what the next stage starts from) whose
run record carries a `checkpoint` entry: the stage, a SHA-256 of its pixels and `settings`,
everything that decides the image up to that stage, the weights included (weights_id.py); the
record is checked when read (checkpoint_records.py). Memory knobs, device and budget are left
out: the same flags on the same machine plan the same knobs, and other knobs (another GPU or
budget) change the pixels by float rounding, not what they show; such a resumed run goes on
from the stage image as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, ResumeMismatchError
from .. import interrupts
from . import checkpoint_records, images
from .checkpoint_names import (NAME as _NAME, candidates as _candidates,
                               hidden_path, legacy_paths, paths_of, stage_path)
from .metadata import read_metadata
from ..schema import OPTIONS
from .image_identity import defining
from .weights_id import changed, same



# ---------------------------------------------------------------- settings


def pixels_digest(image: np.ndarray) -> str:
    """SHA-256 of a uint8 image's shape and bytes: an input or a checkpoint, exactly."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    return hashlib.sha256(repr(image.shape).encode() + image.tobytes()).hexdigest()


def _file_digest(path: str) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(8 << 20):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def _adapters(adapters) -> dict:
    """The plan's adapters (LoRAs carry their hashes) with the control/reference images' digests."""
    out = json.loads(json.dumps(adapters.to_dict()))
    for kind in ("controlnet", "ip_adapter"):
        if kind in out and out[kind].get("image"):
            out[kind]["image_sha256"] = _file_digest(out[kind]["image"])
    return out


def settings(plan, index: int, init_digest: str | None = None, options=OPTIONS) -> dict:
    """Everything that decides stage `index`'s image (see the module note for what is left out)."""
    stages = [{"width": s.width, "height": s.height, "strength": s.strength, "steps": s.steps,
               "guidance": s.guidance, "scheduler": s.scheduler, "seed": s.seed,
               "method": s.method, "demofusion": asdict(s.demofusion) if s.demofusion else None}
              for s in plan.stages[:index + 1]]
    made = defining(plan, options) | {"vae_dtype": plan.vae_dtype, "seed": plan.seed, "init_image": init_digest,
                             "adapters": _adapters(plan.adapters), "stages": stages}
    return json.loads(json.dumps(made))  # as it reads back from a file: lists, not tuples


def differences(want: dict, got: dict) -> list[str]:
    """The names of the settings that differ (stage settings as 'stage N strength')."""
    names = [key for key in want if key not in ("stages", "weights") and want.get(key) != got.get(key)]
    if "weights" in got:  # files written before weights were recorded: see weights_id.same
        names += changed(want.get("weights") or {}, got.get("weights"))
    theirs = got.get("stages") if isinstance(got.get("stages"), list) else []
    for n, stage in enumerate(want["stages"]):
        other = theirs[n] if n < len(theirs) and isinstance(theirs[n], dict) else {}
        names += [f"stage {n + 1} {key}" for key in stage if key != "seed" and stage[key] != other.get(key)]
    if len(theirs) != len(want["stages"]) and not names:
        names.append("the stage count")
    return names


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class Found:
    """A checkpoint file as its record tells it (the record checked: checkpoint_records.check)."""

    path: Path
    stage: int  # 0-based
    settings: dict
    pixels: str  # SHA-256 of the pixels written
    record: dict  # the run record up to this stage
    float32: tuple[str, ...] = ()  # parts the run had moved to float32 (NaN retry) by then
    legacy: bool = False  # under an earlier version's name

    def load(self) -> tuple[np.ndarray | None, str]:
        """(the exact pixels, "") or (None, why they cannot be used)."""
        try:
            image = np.asarray(images.open_image(self.path))
        except InputError:
            return None, "it is no longer a readable image"
        width, height = checkpoint_records.stage_size(self.record)
        if image.shape[:2] != (height, width):
            return None, (f"its image is {image.shape[1]}x{image.shape[0]}, not the "
                          f"{width}x{height} of stage {self.stage + 1}")
        if pixels_digest(image) != self.pixels:
            return None, "its pixels are not the ones it recorded (changed since it was written)"
        return image, ""

    def image(self) -> np.ndarray | None:
        """The exact pixels, or None when the file no longer holds what was written."""
        return self.load()[0]


@dataclass(frozen=True)
class Unusable:
    """A file at a checkpoint's name that cannot be resumed from, and why."""

    path: Path
    why: str
    ours: bool  # a damaged checkpoint of this program (a resumed run may replace it)


def examine(path: Path, legacy: bool = False) -> Found | Unusable | None:
    """What is at `path`: a checkpoint, a damaged or foreign file (Unusable), or None (nothing
    there). A link, folder or FIFO is foreign: never followed (the preflight refuses it)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    if not stat.S_ISREG(mode):
        return Unusable(path, "it is not a regular file", ours=False)
    try:
        record = read_metadata(path).get("record")
    except Exception:  # noqa: BLE001 -- not an image this program can read
        return Unusable(path, "it is not an image this program wrote", ours=False)
    if not isinstance(record, dict) or "checkpoint" not in record:
        return Unusable(path, "it is an image without a checkpoint record", ours=False)
    why = checkpoint_records.check(record)
    if why is not None:
        return Unusable(path, f"its checkpoint record is damaged ({why})", ours=True)
    mark = record["checkpoint"]
    return Found(path=path, stage=mark["stage"] - 1, settings=dict(mark["settings"]),
                 pixels=mark["pixels_sha256"], record=record,
                 float32=tuple(mark.get("float32") or ()), legacy=legacy)


def read(path: Path) -> Found | None:
    """The checkpoint at `path`; None for a missing, foreign or damaged file."""
    found = examine(path)
    return found if isinstance(found, Found) else None


def existing(plan, final: Path) -> list[Found]:
    """This output's checkpoints for the plan's stage names, highest stage first (earlier
    versions' names too: only a match of their settings is used)."""
    found = [f for _, path, legacy in _candidates(plan, final)
             if isinstance(f := examine(path, legacy), Found)]
    return sorted(found, key=lambda f: (-f.stage, f.legacy))


def damaged(plan, final: Path) -> list[Unusable]:
    """This output's checkpoints (current names) whose records are damaged."""
    return [u for _, path in paths_of(plan, final)
            if isinstance(u := examine(path), Unusable) and u.ours]


def others(final: Path) -> list[Found]:
    """Checkpoints of this output under any stage name (other sizes too), highest stage first."""
    try:
        names = os.listdir(final.parent)
    except OSError:
        return []
    found = []
    for name in names:
        m = _NAME.match(name)
        if m and m["stem"] == final.name and (f := read(final.parent / name)) is not None:
            found.append(f)
    return sorted(found, key=lambda f: -f.stage)


@dataclass(frozen=True)
class Start:
    """Where a resumed run starts: after `found.stage`, from its image."""

    found: Found
    image: np.ndarray | None = None  # loaded and checked by load()

    @property
    def stage(self) -> int:
        return self.found.stage

    @property
    def stage_records(self) -> list[dict]:
        return list(self.found.record.get("stages") or [])[:self.stage + 1]


def find_start(plan, final: Path, init_digest: str | None = None, *, load: bool = True,
               notes: list[str] | None = None) -> Start | None:
    """The last finished stage whose settings match and whose file holds what it recorded;
    None when this output has none (start over). `notes` gets one line per checkpoint passed
    over (damaged record, changed pixels, another size), so a caller can say what happens.

    ResumeMismatchError when checkpoints exist but none matches. load=False trusts the files
    without reading their pixels (a cheap test of whose checkpoints these are).
    """
    notes = notes if notes is not None else []
    notes += [f"{u.path}: {u.why}; not used" for u in damaged(plan, final)]
    matching = [f for f in existing(plan, final)
                if f.stage < len(plan.stages) - 1 and f.path.name in _names(plan, final, f.stage)
                and same(settings(plan, f.stage, init_digest), f.settings)]
    for f in matching:
        if not load:
            return Start(f)
        image, why = f.load()
        if image is not None:
            return Start(f, image)
        notes.append(f"{f.path}: {why}; not used")
    if matching:
        return None  # every match was unusable: start over (the notes say why)
    stale = [f for f in existing(plan, final) if not f.legacy] or others(final)
    if stale:
        f = stale[0]
        want = settings(plan, min(f.stage, len(plan.stages) - 1), init_digest)
        what = ", ".join(differences(want, f.settings)) or "the stage sizes"
        raise ResumeMismatchError(f"--resume: {f.path} was made with other settings ({what}); "
                                  "pass the same settings, or --overwrite without --resume to start over")
    return None


def _names(plan, final: Path, index: int) -> set[str]:
    s = plan.stages[index]
    return {p.name for p in (hidden_path(final, index, s.width, s.height),
                             stage_path(final, index, s.width, s.height),
                             *legacy_paths(final, index, s.width, s.height))}


def any_in(folder: Path) -> bool:
    """Whether `folder` holds a file named like a checkpoint (a cheap test before planning)."""
    try:
        return any(_NAME.match(name) for name in os.listdir(folder))
    except OSError:
        return False


def recorded_seeds(plan, folder: Path, init_digest: str | None = None) -> list[int]:
    """Seeds of the checkpoints in `folder` made with the plan's settings but for the seed."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    seeds = []
    for name in names:
        if not _NAME.match(name) or (f := read(folder / name)) is None or f.stage >= len(plan.stages):
            continue
        seed = f.settings.get("seed")
        if isinstance(seed, int) and same(settings(plan.with_seed(seed), f.stage, init_digest), f.settings):
            seeds.append((f.stage, seed))
    return [seed for _, seed in sorted(set(seeds), key=lambda t: -t[0])]


# ---------------------------------------------------------------- writing and clean-up


def mark(plan, index: int, image: np.ndarray, init_digest: str | None, float32=()) -> dict:
    """The `checkpoint` entry of stage `index`'s run record."""
    return {"stage": index + 1, "of": len(plan.stages), "settings": settings(plan, index, init_digest),
            "pixels_sha256": pixels_digest(image), "float32": list(float32)}


def finish(plan, final: Path, keep: bool, init_digest: str | None = None) -> None:
    """After the final image is written: hidden checkpoints go, or become the stage files (keep:
    over a stage file the preflight let this run replace), and matching checkpoints under an
    earlier version's hidden names go."""
    for stage in plan.stages[:-1]:
        hidden = hidden_path(final, stage.index, stage.width, stage.height)
        old = legacy_paths(final, stage.index, stage.width, stage.height)[0]
        with interrupts.critical():
            found = read(old)
            if found is not None and same(settings(plan, stage.index, init_digest), found.settings):
                with contextlib.suppress(OSError):
                    os.unlink(old)
            if not os.path.lexists(hidden):
                continue
            try:
                if keep:
                    os.replace(hidden, stage_path(final, stage.index, stage.width, stage.height))
                else:
                    os.unlink(hidden)
            except OSError:
                pass  # left behind: a later run with --overwrite or --resume replaces it


def reveal(final: Path, stage) -> Path | None:
    """Give stage `stage`'s hidden checkpoint its --save-stages name (never over another file);
    the visible path, or None when there is no hidden checkpoint to move."""
    hidden = hidden_path(final, stage.index, stage.width, stage.height)
    visible = stage_path(final, stage.index, stage.width, stage.height)
    with interrupts.critical():
        try:
            os.link(hidden, visible)  # no-clobber: an existing stage file stays as it is
            os.unlink(hidden)
        except OSError:
            return None
    return visible
