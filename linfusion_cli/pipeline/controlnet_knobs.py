"""The stage's memory knobs on its ControlNets (the UNet's knobs.py is the model-side twin)."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..runtime.batching import split_batch
from .knobs import KnobHandle, apply_knobs


def _join_residuals(first, second):
    """Two half-batch ControlNet outputs as one: residuals concatenated along the batch."""
    down = tuple(torch.cat(pair) for pair in zip(first[0], second[0]))
    mid = torch.cat([first[1], second[1]])
    if isinstance(first, tuple):
        return down, mid
    return type(first)(down_block_res_samples=down, mid_block_res_sample=mid)


def controlnet_knobs(nets, memory, group=None):
    """The stage's memory knobs on the ControlNets too (ff/attention chunks, in-place SiLU,
    CFG split, band-wise forward, over `group`'s ranks like the UNet); offload does not apply,
    skips on CPU only banded (residuals parked as they are made). Returns the undo."""
    handle = KnobHandle()  # every undo runs even where one fails
    try:
        for net in nets:
            # banded, skips_on_cpu parks each residual as it is made; unbanded it does not apply
            park = bool(memory.band_rows) and memory.skips_on_cpu
            handle.add(apply_knobs(net, None, replace(memory, cfg_split=False, skips_on_cpu=park), group))
            if memory.cfg_split:
                previous = net.__dict__.get("forward")
                net.forward = split_batch(net.forward, _join_residuals)
                handle.add(lambda n=net, p=previous: setattr(n, "forward", p) if p else n.__dict__.pop("forward"))
    except BaseException:
        handle()  # what was applied before the failure comes off again
        raise
    return handle


# ---------------------------------------------------------------- stages
