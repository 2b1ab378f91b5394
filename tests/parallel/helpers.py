"""Run a function on N CPU processes joined in a gloo group (band-parallel tests, benchmark)."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, size: int, store: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    try:
        fn(rank, size, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(size: int, fn, *args) -> None:
    """fn(rank, size, *args) on `size` spawned processes (one thread each); raises if one fails.

    fn must be importable by name (a module-level function) and write what it finds to files.
    """
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(_entry, args=(size, store, fn, args), nprocs=size, join=True)
