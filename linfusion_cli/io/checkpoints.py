"""Stage checkpoints: every finished stage's image beside the output, so a killed run can resume.

Stage k of `out/x.png` is kept as `out/.x.stageK-WxH.png` (hidden), or as the `--save-stages`
file `out/x.stageK-WxH.png` when stages are kept: one file serves both. It is a PNG (exact
uint8 pixels: what the next stage starts from) whose run record carries a `checkpoint` entry:
the stage, a SHA-256 of its pixels and `settings`, everything that decides the image up to that
stage. Memory knobs, device and budget are left out: the same flags on the same machine plan
the same knobs, and other knobs (another GPU or budget) change the pixels by float rounding, not
what they show; such a resumed run goes on from the stage image as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, ResumeMismatchError
from .. import interrupts
from . import images
from .metadata import read_metadata

_NAME = re.compile(r"^(?P<hidden>\.?)(?P<stem>.+)\.stage(?P<k>\d+)-(?P<w>\d+)x(?P<h>\d+)\.png$")


# ---------------------------------------------------------------- names


def stage_path(final: Path | None, index: int, width: int, height: int) -> Path:
    """Where --save-stages keeps stage `index`: beside the final file."""
    base = final if final is not None else Path.cwd() / "stdout"
    return base.with_name(f"{base.stem}.stage{index + 1}-{width}x{height}.png")


def hidden_path(final: Path, index: int, width: int, height: int) -> Path:
    """The hidden twin of the --save-stages file: the checkpoint when stages are not kept."""
    visible = stage_path(final, index, width, height)
    return visible.with_name("." + visible.name)


def checkpoint_path(final: Path, stage, keep: bool) -> Path:
    """Where a run writes stage `stage`'s checkpoint: the stage file when kept, else hidden."""
    where = stage_path if keep else hidden_path
    return where(final, stage.index, stage.width, stage.height)


def paths_of(plan, final: Path) -> list[tuple[object, Path]]:
    """(stage, path) for both names of every stage but the last (the last is the output)."""
    return [(s, where(final, s.index, s.width, s.height)) for s in plan.stages[:-1]
            for where in (hidden_path, stage_path)]


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


def settings(plan, index: int, init_digest: str | None = None) -> dict:
    """Everything that decides stage `index`'s image (see the module note for what is left out)."""
    stages = [{"width": s.width, "height": s.height, "strength": s.strength, "steps": s.steps,
               "guidance": s.guidance, "scheduler": s.scheduler, "seed": s.seed,
               "method": s.method, "demofusion": asdict(s.demofusion) if s.demofusion else None}
              for s in plan.stages[:index + 1]]
    made = {"prompt": plan.prompt, "negative": plan.negative, "model": plan.model,
            "family": plan.family, "linfusion": plan.linfusion, "dtype": plan.dtype,
            "vae_dtype": plan.vae_dtype, "seed": plan.seed, "init_image": init_digest,
            "adapters": _adapters(plan.adapters), "stages": stages}
    return json.loads(json.dumps(made))  # as it reads back from a file: lists, not tuples


def differences(want: dict, got: dict) -> list[str]:
    """The names of the settings that differ (stage settings as 'stage N strength')."""
    names = [key for key in want if key != "stages" and want.get(key) != got.get(key)]
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
    """A checkpoint file as its record tells it."""

    path: Path
    stage: int  # 0-based
    settings: dict
    pixels: str  # SHA-256 of the pixels written
    record: dict  # the run record up to this stage
    float32: tuple[str, ...] = ()  # parts the run had moved to float32 (NaN retry) by then

    def image(self) -> np.ndarray | None:
        """The exact pixels, or None when the file no longer holds what was written."""
        try:
            image = np.asarray(images.open_image(self.path))
        except InputError:
            return None
        return image if pixels_digest(image) == self.pixels else None


def read(path: Path) -> Found | None:
    """The checkpoint at `path`; None for a missing, foreign or damaged file and for anything but
    a regular file (a link is never followed; the preflight refuses it as an output)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
    except OSError:
        return None
    try:
        record = read_metadata(path).get("record") or {}
        mark = record["checkpoint"]
        return Found(path=path, stage=int(mark["stage"]) - 1, settings=dict(mark["settings"]),
                     pixels=str(mark["pixels_sha256"]), record=record,
                     float32=tuple(str(p) for p in mark.get("float32") or ()))
    except Exception:  # noqa: BLE001 -- not ours, or damaged: not a checkpoint
        return None


def existing(plan, final: Path) -> list[Found]:
    """This output's checkpoints for the plan's stage names, highest stage first."""
    found = [f for _, path in paths_of(plan, final) if (f := read(path)) is not None]
    return sorted(found, key=lambda f: -f.stage)


def others(final: Path) -> list[Found]:
    """Checkpoints of this output under any stage name (other sizes too), highest stage first."""
    try:
        names = os.listdir(final.parent)
    except OSError:
        return []
    found = []
    for name in names:
        m = _NAME.match(name)
        if m and m["stem"] == final.stem and (f := read(final.parent / name)) is not None:
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


def find_start(plan, final: Path, init_digest: str | None = None, *, load: bool = False) -> Start | None:
    """The last finished stage whose settings match; None when this output has no checkpoint.

    ResumeMismatchError when checkpoints exist but none matches. load=True reads the pixels
    too and passes over a file that no longer holds what was written.
    """
    matching = []
    for f in existing(plan, final):
        if f.stage < len(plan.stages) - 1 and f.path.name in _names(plan, final, f.stage) \
                and f.settings == settings(plan, f.stage, init_digest):
            matching.append(f)
    for f in matching:
        if not load:
            return Start(f)
        image = f.image()
        if image is not None:
            return Start(f, image)
    if matching:
        return None  # every match was damaged: start over
    stale = existing(plan, final) or others(final)
    if stale:
        f = stale[0]
        want = settings(plan, min(f.stage, len(plan.stages) - 1), init_digest)
        what = ", ".join(differences(want, f.settings)) or "the stage sizes"
        raise ResumeMismatchError(f"--resume: {f.path} was made with other settings ({what}); "
                                  "pass the same settings, or --overwrite without --resume to start over")
    return None


def _names(plan, final: Path, index: int) -> set[str]:
    s = plan.stages[index]
    return {hidden_path(final, index, s.width, s.height).name, stage_path(final, index, s.width, s.height).name}


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
        if isinstance(seed, int) and f.settings == settings(plan.with_seed(seed), f.stage, init_digest):
            seeds.append((f.stage, seed))
    return [seed for _, seed in sorted(set(seeds), key=lambda t: -t[0])]


# ---------------------------------------------------------------- writing and clean-up


def mark(plan, index: int, image: np.ndarray, init_digest: str | None, float32=()) -> dict:
    """The `checkpoint` entry of stage `index`'s run record."""
    return {"stage": index + 1, "of": len(plan.stages), "settings": settings(plan, index, init_digest),
            "pixels_sha256": pixels_digest(image), "float32": list(float32)}


def finish(plan, final: Path, keep: bool) -> None:
    """After the final image is written: hidden checkpoints go, or become the stage files (keep)."""
    for stage in plan.stages[:-1]:
        hidden = hidden_path(final, stage.index, stage.width, stage.height)
        if not os.path.lexists(hidden):
            continue
        visible = stage_path(final, stage.index, stage.width, stage.height)
        with interrupts.critical():
            try:
                if keep:
                    with contextlib.suppress(FileExistsError):
                        os.link(hidden, visible)  # no-clobber: an existing stage file stays
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
