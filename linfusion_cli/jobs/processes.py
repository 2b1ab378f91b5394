"""A request as a launcher's processes run it: one image over all of them (band parallelism), or
a batch's images shared out; the band group they compute with; who loads the model first."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from .. import parallel
from ..errors import InputError
from ..io.prompts import read_prompt_argument
from ..planning.option_classes import Request


def for_world(req: Request, world) -> Request:
    """The request as the launcher's processes run it: over all of them (band parallelism), one
    seed (rank 0's draw) and each rank's own device; --world-size alone plans (--dry-run) only."""
    if not world.distributed:
        if (req.world_size or 1) > 1 and not req.dry_run:
            raise InputError(f"--world-size {req.world_size} plans for {req.world_size} processes "
                             "(with --dry-run); to run, start them: torchrun --nproc-per-node "
                             f"{req.world_size} -m linfusion_cli ...")
        return req
    if req.world_size not in (None, world.size):
        raise InputError(f"--world-size {req.world_size} but the launcher started {world.size} "
                         "processes (WORLD_SIZE)")
    return replace(req, world_size=world.size, seed=req.seed if req.seed is not None else world.seed,
                   device=world.device(req.device))


def batch_for_world(base: Request, world, parallel_mode: str) -> Request:
    """The batch's request for its world: --parallel bands plans each image over every rank (or,
    in a dry run without a launcher, over --world-size processes); images, one process each."""
    size = base.world_size or 1
    if parallel_mode == "images":
        if size > 1:
            raise InputError("--world-size plans one image over several processes: with batch, "
                             "pass --parallel bands")
        return base
    if world.distributed:
        if base.world_size not in (None, world.size):
            raise InputError(f"--world-size {size} but the launcher started {world.size} processes")
        return replace(base, world_size=world.size)
    if size > 1 and not base.dry_run:
        raise InputError(f"--world-size {size} plans for {size} processes (with --dry-run); to run, "
                         f"start them: torchrun --nproc-per-node {size} -m linfusion_cli batch ...")
    return base


@contextlib.contextmanager
def band_group(world, device: str):
    """Under a launcher, the band-parallel group every rank computes the image with, its tensors
    on `device` (the plan's: this rank's GPU, or the CPU)."""
    if not world.distributed:
        yield None
        return
    with parallel.band_parallel(world.rank, world.size, torch.device(device)) as group:
        yield group


def rank0_first(load_model, world, group):
    """load_model() on rank 0 first, then on the other ranks of `world` when they compute images
    together (`group`, the band group; World.in_turn): a demo model is built and a download made
    once, then read from the cache."""
    if group is None:
        return load_model()
    return world.in_turn(load_model)


def shared_prompt(prompt: str | None, world, stdin) -> str:
    """read_prompt_argument; under a launcher, rank 0 reads stdin and every rank gets its text."""
    if not world.distributed:
        return read_prompt_argument(prompt, stdin)
    text, problem = None, None
    if world.rank == 0:
        try:
            text = read_prompt_argument(prompt, stdin)
        except InputError as exc:  # every rank must reach the broadcast
            problem = str(exc)
    text, problem = world.share((text, problem))
    if problem is not None:
        raise InputError(problem)
    return text
