"""A checkpoint's run record checked field by field when it is read, not when a run ends on it.

A resumed run copies the stage records of its checkpoint into the final image's record and
starts from its pixels: a field of the wrong type found only after the last stage would fail
every retry. check() names the first bad field, so the caller can say what it does instead.
"""

from __future__ import annotations

import re

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# stage record fields the final record, the --json summary and the image's A1111 text read
_STAGE_INTS = ("width", "height", "denoise_steps")
_STAGE_NUMBERS = ("seconds",)
_STAGE_OPTIONAL_NUMBERS = ("strength", "peak_gib")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check(record) -> str | None:
    """What is wrong with a checkpoint's run record (one phrase), or None when it is usable."""
    if not isinstance(record, dict):
        return "its record is not an object"
    mark = record.get("checkpoint")
    if not isinstance(mark, dict):
        return "its record has no checkpoint entry"
    stage = mark.get("stage")
    if not _whole(stage) or stage < 1:
        return "checkpoint.stage is not a stage number"
    if not _whole(mark.get("of")) or mark["of"] <= stage:
        return "checkpoint.of is not a stage count above its stage"
    if not isinstance(mark.get("settings"), dict):
        return "checkpoint.settings is not an object"
    if not isinstance(mark.get("pixels_sha256"), str) or not _SHA256.match(mark["pixels_sha256"]):
        return "checkpoint.pixels_sha256 is not a SHA-256"
    float32 = mark.get("float32", [])
    if not isinstance(float32, list) or not all(p in ("unet", "vae") for p in float32):
        return "checkpoint.float32 is not a list of the parts unet, vae"
    stages = record.get("stages")
    if not isinstance(stages, list) or len(stages) < stage:
        return f"its record does not hold {stage} stage record(s)"
    for n, entry in enumerate(stages[:stage], 1):
        if not isinstance(entry, dict):
            return f"stages[{n}] is not an object"
        for key in _STAGE_INTS:
            if not _whole(entry.get(key)) or entry[key] <= 0:
                return f"stages[{n}].{key} is not a positive whole number"
        for key in _STAGE_NUMBERS:
            if not _number(entry.get(key)):
                return f"stages[{n}].{key} is not a number"
        for key in _STAGE_OPTIONAL_NUMBERS:
            if key not in entry or not (entry[key] is None or _number(entry[key])):
                return f"stages[{n}].{key} is missing or not a number"
    return None


def stage_size(record: dict) -> tuple[int, int]:
    """(width, height) the checkpoint's own stage record says its image has (a checked record)."""
    entry = record["stages"][record["checkpoint"]["stage"] - 1]
    return entry["width"], entry["height"]
