"""Apply a stage's memory plan around its run: model-side knobs and guidance as half batches."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def cfg_split(unet):
    """Run a classifier-free-guidance batch as half batches: same output, half the activations."""
    forward = unet.forward

    def split_forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
        if sample.shape[0] < 2 or sample.shape[0] % 2 or kwargs.get("return_dict", True):
            return forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        half = sample.shape[0] // 2
        outs = []
        for part in (slice(0, half), slice(half, None)):
            kw = dict(kwargs)
            if kw.get("added_cond_kwargs"):
                kw["added_cond_kwargs"] = {k: v[part] for k, v in kw["added_cond_kwargs"].items()}
            t = timestep[part] if torch.is_tensor(timestep) and timestep.ndim and timestep.shape[0] == sample.shape[0] else timestep
            outs.append(forward(sample[part], t, encoder_hidden_states[part], *args, **kw)[0])
        return (torch.cat(outs),)

    unet.forward = split_forward
    try:
        yield
    finally:
        del unet.forward  # the class's own forward again


def next_tighter(memory):
    """The next tighter plan for an out-of-memory retry, or None."""
    if memory is None:
        return None
    from ..memory.planner import next_tighter as planner_next

    return planner_next(memory)


@contextlib.contextmanager
def memory_knobs(model, memory):
    """Apply a MemoryPlan's knobs to the shared components for one stage, then undo them."""
    if memory is None:
        yield
        return
    from ..memory.knobs import apply_knobs

    undo = apply_knobs(model.pipe.unet, model.pipe.vae, memory)
    try:
        if getattr(memory, "cfg_split", False):
            with cfg_split(model.pipe.unet):
                yield
        else:
            yield
    finally:
        if callable(undo):
            undo()
