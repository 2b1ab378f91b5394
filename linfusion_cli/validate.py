"""One rule and one message per value, whatever the path it came by (flag, preset, batch line).

Every check runs when the plan is made, before any weights load; callers add where the value came
from (a flag name, `file: key 'x'`, `file:line:`) in front of the message.
"""

from __future__ import annotations

import importlib.util
import json
import re
import math
from typing import Any

from .bounds import shown
from .errors import InputError, PlanError
from .inputs import read_bounded

SEED_MAX = 2 ** 32 - 1  # as AUTOMATIC1111: seeds are 0 .. 2**32-1 on every path
MAX_SIDE = 32768
MAX_STEPS = 1000  # the SD schedulers' num_train_timesteps: no scheduler accepts more steps
MAX_GUIDANCE = 100.0  # far above any useful scale; larger values only saturate the image
MAX_VRAM_GIB = 4096.0
MAX_ASPECT = 64.0  # W:H (or H:W) beyond this leaves a side of a few pixels at any --res
MAX_TEXT = 100_000  # characters in a prompt (CLIP reads 77 tokens; this bounds the metadata)
NAME_MAX = 255  # bytes in one file-name component (ext4, APFS, NTFS)
SCHEDULERS = ("default", "ddim", "euler", "euler_a", "dpm++", "pndm", "lms")
METHODS = ("sdedit", "demofusion")  # how the x2 stages denoise (planning/method.py)


class ValueRuleError(PlanError):
    """A value breaking its rule; the message starts with the value's name."""


def _number(name: str, value: Any, *, integer: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float) if not integer else int):
        if integer and isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)
        kind = "an integer" if integer else "a number"
        raise ValueRuleError(f"{name} must be {kind}, got {value!r}")
    if not integer and not math.isfinite(value):
        raise ValueRuleError(f"{name} must be a finite number, got {value}")
    return value


def in_range(name: str, value: Any, low: float, high: float, *, integer: bool = False,
             low_open: bool = False) -> Any:
    """`name` is a number within [low, high] (or (low, high]); zero, negatives, inf, nan refused."""
    value = _number(name, value, integer=integer)
    below = value <= low if low_open else value < low
    if below or value > high:
        left = "(" if low_open else "["
        shown = lambda x: f"{x:g}" if isinstance(x, float) else str(x)  # noqa: E731
        raise ValueRuleError(f"{name} must be in {left}{shown(low)}, {shown(high)}], got {value}")
    return value


def steps(value: Any, name: str = "steps") -> int:
    return in_range(name, value, 1, MAX_STEPS, integer=True)


def guidance(value: Any, name: str = "guidance") -> float:
    return float(in_range(name, value, 0.0, MAX_GUIDANCE))


def strength(value: Any, name: str = "strength") -> float:
    return float(in_range(name, value, 0.0, 1.0, low_open=True))


def seed(value: Any, name: str = "seed") -> int:
    """0 .. 2**32-1 (callers turn -1, "random" as in AUTOMATIC1111, into None first)."""
    value = _number(name, value, integer=True)
    if not 0 <= value <= SEED_MAX:
        raise ValueRuleError(f"{name} must be -1 (random) or in [0, {SEED_MAX}], got {value}")
    return value


def side(value: Any, name: str) -> int:
    """A size in px: 8 .. 32768 (the multiple of 8 is checked with the plan's sizes)."""
    return in_range(name, value, 8, MAX_SIDE, integer=True)


def max_vram(value: Any, name: str = "max_vram") -> float:
    return float(in_range(name, value, 0.0, MAX_VRAM_GIB, low_open=True))


def gpu(value: Any, name: str = "gpu") -> str:
    """A GPU of the table in gpus.py, by name (h100, rtx4090, ...): its canonical name."""
    from .gpus import gpu_named  # core module beside this one; imported here to keep gpus optional for rules

    if not isinstance(value, str) or not value.strip():
        raise ValueRuleError(f"{name} must be a GPU name, got {value!r}")
    try:
        return gpu_named(value).name
    except PlanError as exc:
        raise ValueRuleError(str(exc).replace("--gpu", name, 1)) from None


MIN_VAE_TILE = 64  # px: smaller tiles are 8 latent pixels or fewer, all seam and overhead
MAX_VAE_TILES = 16384  # tiles per decode: a 16K image in 128 px tiles; more is hours of overhead


def vae_tile(value: Any, name: str = "vae_tile") -> int:
    value = in_range(name, value, 0, MAX_SIDE, integer=True)
    if value % 8 or 0 < value < MIN_VAE_TILE:
        raise ValueRuleError(f"{name} must be 0 (untiled) or a multiple of 8 of at least "
                             f"{MIN_VAE_TILE}, got {value}")
    return value


def vae_tile_count(tile: int, width: int, height: int, name: str = "--vae-tile") -> None:
    """At plan time: a tile that cuts the image into more than MAX_VAE_TILES pieces is refused."""
    count = -(-width // tile) * -(-height // tile) if tile else 1
    if count > MAX_VAE_TILES:
        raise ValueRuleError(f"{name} {tile} cuts {width}x{height} into {count} tiles (at most "
                             f"{MAX_VAE_TILES}); use a tile of at least "
                             f"{_smallest_tile(width, height)} px, or leave it to the planner")


def _smallest_tile(width: int, height: int) -> int:
    tile = MIN_VAE_TILE
    while -(-width // tile) * -(-height // tile) > MAX_VAE_TILES:
        tile += 8
    return tile


def aspect(value: Any, name: str = "aspect") -> tuple[float, float]:
    """'W:H' with both finite and positive, at most 64:1 either way."""
    try:
        if not isinstance(value, str):
            raise ValueError
        aw, ah = (float(x) for x in value.split(":"))
        if not (math.isfinite(aw) and math.isfinite(ah)) or aw <= 0 or ah <= 0:
            raise ValueError
    except ValueError:
        raise ValueRuleError(f"{name} must look like 16:9 (two positive numbers), got {value!r}") from None
    if max(aw, ah) / min(aw, ah) > MAX_ASPECT:
        raise ValueRuleError(f"{name} {value} is beyond {MAX_ASPECT:g}:1")
    return aw, ah


def text(value: Any, name: str = "prompt", *, empty_ok: bool = True) -> str:
    """Text a tokenizer and the metadata can hold: valid UTF-8, no NUL bytes, bounded."""
    if not isinstance(value, str):
        raise ValueRuleError(f"{name} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes from argv or a file arrive as lone surrogates
        raise ValueRuleError(f"{name} is not valid UTF-8 text") from None
    if "\0" in value:
        raise ValueRuleError(f"{name} contains a NUL byte")
    if len(value) > MAX_TEXT:
        raise ValueRuleError(f"{name} is {len(value)} characters; the limit is {MAX_TEXT}")
    if not empty_ok and not value.strip():
        raise ValueRuleError(f"{name} is empty")
    return value


def strengths_text(value: str, name: str = "--strengths") -> tuple[float, ...]:
    """'0.4,0.3' -> (0.4, 0.3); an empty item ('0.4,,0.3') is refused, not skipped."""
    items = value.split(",")
    if not value.strip():
        raise ValueRuleError(f"{name} is empty")
    out = []
    for item in items:
        if not item.strip():
            raise ValueRuleError(f"{name} has an empty item: {value!r}")
        try:
            number = float(item)
        except ValueError:
            raise ValueRuleError(f"{name} must be numbers separated by commas, got {value!r}") from None
        out.append(strength(number))
    return tuple(out)


def scheduler_needs(name: str) -> None:
    """Optional packages a scheduler imports when it is built, checked before any weights load."""
    if name == "lms" and importlib.util.find_spec("scipy") is None:
        raise InputError("--scheduler lms needs scipy (pip install scipy); or pick another scheduler")


def aspect_text(value: Any, name: str = "aspect") -> str:
    """The aspect as written ('16:9'), once aspect's rule accepts it."""
    aspect(value, name)
    return value


def strengths(value: Any, name: str = "strengths") -> tuple[float, ...]:
    """A non-empty list of img2img strengths, each in (0, 1]."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueRuleError(f"{name} must be a list of numbers in (0, 1], got {shown(value)}")
    return tuple(strength(x, name) for x in value)


def scheduler(value: Any, name: str = "scheduler") -> str:
    """One of SCHEDULERS, whose optional packages are installed."""
    if value not in SCHEDULERS:
        raise ValueRuleError(f"unknown scheduler {value!r}; use {', '.join(SCHEDULERS)}")
    scheduler_needs(value)
    return value


def method(value: Any, name: str = "method") -> str:
    """One of METHODS."""
    if value not in METHODS:
        raise ValueRuleError(f"unknown method {value!r}; use {' or '.join(METHODS)}")
    return value


def finite(value: Any, name: str) -> float:
    """Any finite number (adapter scales: negative ones invert the effect)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueRuleError(f"{name} must be a finite number, got {shown(value)}")
    return float(value)


def source(value: Any, name: str) -> str:
    """A path or hub id: non-empty text."""
    if not isinstance(value, str) or not value:
        raise ValueRuleError(f"{name} must be a path or hub id, got {shown(value)}")
    return text(value, name)


def loras(value: Any, name: str = "lora") -> tuple[str, ...]:
    """One FILE|ID[:WEIGHT] or a list of them (the weight is parsed with the plan)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or \
            not all(isinstance(v, str) and v for v in items):
        raise ValueRuleError(f"{name} must be FILE|ID[:WEIGHT] or a list of them, got {shown(value)}")
    return tuple(text(v, name) for v in items)


def world_size(value: Any, name: str = "world_size") -> int:
    """Processes one image runs over (band parallelism): a whole number 1 .. 1024."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024:
        raise ValueRuleError(f"{name} must be a whole number of processes 1 .. 1024, got {shown(value)}")
    return value


PARALLEL_MODES = ("images", "bands")


def parallel(value: Any, name: str = "--parallel") -> str:
    """How a batch under torchrun uses its ranks: whole images each, or every image over all."""
    if value not in PARALLEL_MODES:
        raise ValueRuleError(f"{name} must be images or bands, got {shown(value)}")
    return value


def json_object(path, what: str, error=InputError) -> dict:
    """A JSON file that must hold an object (configs): anything else is one `error` line."""
    text = read_bounded(path, what, error=error)  # a regular file of at most a few MiB
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise error(f"{what} {path} is not readable JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} must be a JSON object")
    return data


def device(value: str, name: str = "--device") -> str:
    """auto, cpu, mps, cuda or cuda:N; anything else (meta, xla, ...) refused."""
    text(value, name)
    if value in ("auto", "cpu", "mps", "cuda") or re.fullmatch(r"cuda:\d{1,3}", value):
        return value
    raise ValueRuleError(f"{name} must be auto, cpu, mps, cuda or cuda:N, got {value!r}")


def file_name(name: str, what: str) -> str:
    """One path component a filesystem accepts: no NUL, at most 255 bytes."""
    if "\0" in name:
        raise InputError(f"{what} contains a NUL byte")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise InputError(f"{what} is not valid UTF-8") from None
    if size > NAME_MAX:
        raise InputError(f"{what}: file name {name[:40]!r}... is {size} bytes; the limit is {NAME_MAX}")
    return name


PREVIEW_METHODS = ("auto", "latent2rgb", "taesd")  # how --preview draws the latents (pipeline/preview.py)
PROGRESS_MODES = ("bar", "json", "none")  # what the CLI writes on stderr while it runs
MAX_PREVIEW_PX = 8192  # a preview's long side: a screen's worth, never a stage's 16K


def preview_method(value: Any, name: str = "--preview-method") -> str:
    if value not in PREVIEW_METHODS:
        raise ValueRuleError(f"{name} must be {', '.join(PREVIEW_METHODS[:-1])} or "
                             f"{PREVIEW_METHODS[-1]}, got {shown(value)}")
    return value


def preview_size(value: Any, name: str = "--preview-size") -> int:
    """The preview's long side in px: 64 .. MAX_PREVIEW_PX."""
    return in_range(name, value, 64, MAX_PREVIEW_PX, integer=True)


def preview_every(value: Any, name: str = "--preview-every") -> int:
    """Denoising steps between previews: 1 .. MAX_STEPS."""
    return in_range(name, value, 1, MAX_STEPS, integer=True)


def progress(value: Any, name: str = "--progress") -> str:
    if value not in PROGRESS_MODES:
        raise ValueRuleError(f"{name} must be bar, json or none, got {shown(value)}")
    return value
