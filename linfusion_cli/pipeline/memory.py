"""Apply a stage's memory plan around its run (the knobs themselves live in memory/knobs.py)."""

from __future__ import annotations

import contextlib


def next_tighter(memory, device: str = "cuda"):
    """The next tighter plan for an out-of-memory retry, or None."""
    if memory is None:
        return None
    from ..memory.planner import next_tighter as planner_next

    return planner_next(memory, device)


@contextlib.contextmanager
def memory_knobs(model, memory):
    """Apply a MemoryPlan's model-side knobs to the shared components for one stage, then undo."""
    if memory is None:
        yield
        return
    from ..memory.knobs import apply_knobs

    undo = apply_knobs(model.pipe.unet, model.pipe.vae, memory)
    nets = list(getattr(model, "controlnets", {}).values())
    if nets:
        from ..adapters.controlnet import controlnet_knobs

        undo_nets = controlnet_knobs(nets, memory)
    try:
        yield
    finally:
        if nets:
            undo_nets()
        undo()
