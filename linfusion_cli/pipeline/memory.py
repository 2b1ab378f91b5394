"""Apply a stage's whole memory plan around its run, and report what was in effect."""

from __future__ import annotations

import contextlib
from .controlnet_knobs import controlnet_knobs
from .knobs import apply_memory_plan, read_knobs


@contextlib.contextmanager
def memory_plan_applied(model, memory):
    """Every model-side knob of `memory` on the shared components for one stage, then undone.

    Yields the knobs in effect, read back from the modules (pipeline.knobs.read_knobs), so the
    run record says what ran rather than what was asked. ControlNets get the same chunking,
    in-place and guidance-split knobs (pipeline.controlnet_knobs).
    """
    if memory is None:
        yield read_knobs(model.pipe)
        return
    undo = apply_memory_plan(model.pipe, memory, model.device)
    nets = list(getattr(model, "controlnets", {}).values())
    undo_nets = None
    if nets:
        undo_nets = controlnet_knobs(nets, memory)
    try:
        yield read_knobs(model.pipe)
    finally:
        if undo_nets is not None:
            undo_nets()
        undo()
