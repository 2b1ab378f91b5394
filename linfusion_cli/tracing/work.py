"""Count the work of one real UNet forward (FLOPs and aten ops) at any size, without a GPU.

The UNet is the meta-device one tracing/unet.py builds, with the plan's knobs applied by the
code a run uses; torch's FlopCounterMode counts the FLOPs of every matmul and convolution from
the shapes alone, and a small dispatch mode counts the aten ops that are not views (a proxy
for kernel launches). The band-wise forward is held to the whole-map forward's work this way
(tests/bands/test_work.py, benchmarks/band_flops.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ..pipeline.knobs import apply_knobs
from .unet import _inputs


class OpCount(TorchDispatchMode):
    """How many aten ops that are not views ran inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops += 1
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class Work:
    """One forward's FLOPs, the convolutions' share of them, and its non-view aten ops."""

    flops: int
    conv_flops: int
    ops: int


def unet_work(unet, *, width: int, height: int, knobs, batch: int = 2,
              dtype: torch.dtype = torch.float16) -> Work:
    """The work of one forward of a meta UNet (tracing.unet.meta_unet) at (width, height) px
    under `knobs` (a MemoryPlan, applied with pipeline.knobs.apply_knobs and undone after)."""
    sample, t, context, kwargs = _inputs(unet, batch, -(-height // 8), -(-width // 8), dtype)
    undo = apply_knobs(unet, None, knobs)
    try:
        flops, ops = FlopCounterMode(display=False), OpCount()
        with torch.inference_mode(), flops, ops:
            unet(sample, t, encoder_hidden_states=context, **kwargs)
    finally:
        undo()
    counts = flops.get_flop_counts()["Global"]  # {aten op packet: FLOPs}
    conv = counts.get(torch.ops.aten.convolution, 0)
    return Work(flops=flops.get_total_flops(), conv_flops=conv, ops=ops.ops)
