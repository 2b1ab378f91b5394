"""Batch rows of nested inputs and a batch split into halves (the CFG split, ControlNet rows)."""

from __future__ import annotations

import torch


def batch_rows(obj, start: int, stop: int, batch: int):
    """Rows start:stop (views) of every tensor in obj (nested tuples, lists, dicts) whose first
    dim is the batch; other values as they are. The CFG split's halves, the ControlNet's rows."""
    if torch.is_tensor(obj):
        return obj[start:stop] if obj.dim() and obj.shape[0] == batch else obj
    if isinstance(obj, dict):
        return {k: batch_rows(v, start, stop, batch) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(batch_rows(v, start, stop, batch) for v in obj)
    return obj


def batch_half(obj, index: int, batch: int):
    """The index-th half of obj's batch (batch_rows)."""
    half = batch // 2
    return batch_rows(obj, index * half, (index + 1) * half, batch)


def split_batch(forward, join):
    """`forward` run on an even batch as two halves, `join(first, second)` merging the outputs.

    The UNet's CFG split (join_unet_outputs) and the ControlNets' (their residuals) share it.
    """
    def split_forward(sample, *args, **kwargs):
        batch = sample.shape[0]
        if batch < 2 or batch % 2:
            return forward(sample, *args, **kwargs)
        return join(*(forward(*batch_half((sample, *args), i, batch), **batch_half(kwargs, i, batch))
                      for i in (0, 1)))
    return split_forward


def join_unet_outputs(first, second):
    """Two half-batch UNet outputs as one (a tuple or UNet2DConditionOutput)."""
    if isinstance(first, tuple):
        return (torch.cat([first[0], second[0]]), *first[1:])
    return type(first)(sample=torch.cat([first.sample, second.sample]))
