"""What defines an image, declared once: the options flagged `defines_image` in schema.OPTIONS
(their plan values under their own names), the model's family and weights, and the stage list,
adapters, seed and input image the other options shape. Stage checkpoints (checkpoints.settings),
manifest lines (fingerprint) and image records (same_settings) derive from `defining`; each adds
its stage list, seed and inputs in the form earlier versions wrote, so their files still read.
Memory knobs, device and budget are left out: they change float rounding, not what is shown.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ..schema import OPTIONS, image_options
from .weights_id import identity, same


def defining(plan, options=OPTIONS) -> dict:
    """The part every form shares: each flagged option's plan value, the family and the weights."""
    return {name: getattr(plan, name) for name in image_options(options)} | {
        "family": plan.family, "weights": identity(plan)}


def _stage_key(width, height, strength, steps, guidance, scheduler, seed_offset, method,
               demofusion) -> list:
    """One stage's defining settings, the same from a plan and from an image's record."""
    return [width, height, strength, steps, guidance, scheduler, seed_offset, method or "sdedit",
            demofusion or None]


def fingerprint(plan, options=OPTIONS) -> dict[str, Any]:
    """A manifest line's params: what defines an image besides its seed."""
    return defining(plan, options) | {
        "init_image": plan.init_image, "adapters": plan.adapters.to_dict(),
        "stages": [_stage_key(s.width, s.height, s.strength, s.steps, s.guidance, s.scheduler,
                              s.seed - plan.seed, s.method,
                              asdict(s.demofusion) if s.demofusion is not None else None)
                   for s in plan.stages],
    }


def same_settings(record: dict, plan, options=OPTIONS) -> bool:
    """An image's own metadata record shows the plan's settings and seed (files without a manifest line)."""
    want = fingerprint(plan, options)
    del want["dtype"]  # the record holds the resolved dtype, the plan may say "auto"
    try:
        got = {key: record[key] for key in want if key not in ("stages", "adapters", "weights")}
        if "weights" in record:
            got["weights"] = record["weights"]
        got["adapters"] = record.get("adapters") or {}
        got["stages"] = [_stage_key(s["width"], s["height"], s["strength"], s["steps"], s["guidance"],
                                    s["scheduler"], s["seed"] - record["seed"], s.get("method"),
                                    s.get("demofusion")) for s in record["stages"]]
    except (KeyError, TypeError):
        return False
    return same(want, got) and record.get("seed") == plan.seed


def recorded(plan, record: dict, options=OPTIONS) -> dict:
    """A run record with every flagged option the record does not already hold in its own form."""
    return {name: getattr(plan, name) for name in image_options(options) if name not in record} | record
