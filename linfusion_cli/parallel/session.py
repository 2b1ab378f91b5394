"""The band-parallel group a command runs under: made once from the launcher's world and passed
as an argument to what computes with it (pipeline knobs, the tiled VAE, the run record)."""

from __future__ import annotations

import contextlib
import datetime

import torch
import torch.distributed as dist

from .launch import PEERS
from .comm import BandGroup


def timeout_s() -> float:
    """Seconds a rank waits for its peers at any message before the run stops (InputError if the
    variable is not seconds in (0, 86400))."""
    return PEERS.seconds()


def make_group(rank: int, size: int, device: torch.device | str) -> BandGroup:
    """A BandGroup over every process of the initialised default group, with its own timeout
    (a rank that hangs ends the run after timeout_s()); NCCL for CUDA tensors where there are."""
    device = torch.device(device)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    pg = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s()))
    return BandGroup(rank, size, device, pg)


@contextlib.contextmanager
def band_parallel(rank: int, size: int, device: torch.device | str):
    """make_group's group for the block, then ended in step: after a run every rank
    waits for the others (rank 0 may still be writing the file) before any tears its sockets down,
    so none is left reading from a peer that has gone; after a failure, at once."""
    group = make_group(rank, size, device)
    try:
        yield group
        group.barrier()
    finally:
        group.close()
