"""Drivers that run tile generators: all in lock step (exact stats) or one by one (fixed stats)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from .blocks import TileCtx
from .norm import GroupStats, group_stats, pool
from .tiles import Tile

# A tile job: (tile index, generator). `finish(index, result)` receives each finished tile.
Finish = Callable[[int, object], None]


def _step(gen, value):
    """Advance a generator; returns (request, None) or (None, result) when it is done."""
    try:
        return gen.send(value), None
    except StopIteration as stop:
        return None, stop.value


def run_lockstep(jobs: Iterable, finish: Finish, pooled=pool) -> int:
    """Advance every tile to its next GroupNorm, pool their core moments, answer all, repeat.

    Cores partition the image, so the pooled moments are the whole image's: every tile
    normalises with exactly the untiled statistics. Returns the number of GroupNorm rounds.
    """
    waiting: dict[int, tuple] = {}
    for i, gen in jobs:
        req, out = _step(gen, None)
        if req is None:
            finish(i, out)
        else:
            waiting[i] = (gen, req)
    rounds = 0
    while waiting:
        reqs = [r for _, r in waiting.values()]
        norm = reqs[0].norm
        if any(r.norm is not norm for r in reqs):
            raise RuntimeError("tiles fell out of lock step")
        stats = pooled([r.moments for r in reqs], norm.num_groups)
        rounds += 1
        nxt = {}
        for i, (gen, _) in waiting.items():
            req, out = _step(gen, stats)
            if req is None:
                finish(i, out)
            else:
                nxt[i] = (gen, req)
        waiting = nxt
    return rounds


def run_fixed(gen, stats: list[GroupStats]):
    """Run one tile alone, answering its k-th GroupNorm with stats[k] (estimated mode)."""
    req, out = _step(gen, None)
    k = 0
    while req is not None:
        if k >= len(stats):
            raise RuntimeError("tile asked for more GroupNorm stats than were recorded")
        req, out = _step(gen, stats[k])
        k += 1
    return out


def run_recording(gen) -> tuple[object, list[GroupStats]]:
    """Run one tile alone on its own core's stats, recording them (the downscaled stats pass)."""
    req, out = _step(gen, None)
    record: list[GroupStats] = []
    while req is not None:
        s = pool([req.moments], req.norm.num_groups)
        record.append(s)
        req, out = _step(gen, s)
    return out, record


def shared_pool(group):
    """pool() over every rank's tiles: each rank's moment sums, all-reduced through `group`
    (a parallel.BandGroup, handed in) before the group stats are formed. The buffer stays on the
    moments' device: a CUDA run's goes through NCCL, a CPU run's through gloo (the group's
    backend follows the tensor's device), and nothing is read back to the host."""
    def pooled(parts: list, groups: int) -> GroupStats:
        c, like = parts[0].mean.shape[0], parts[0].mean
        count = torch.full((1,), float(sum(p.count for p in parts)), dtype=like.dtype,
                           device=like.device)  # a fill, not a host copy
        flat = torch.cat([torch.stack([p.mean * p.count for p in parts]).sum(0),
                          torch.stack([p.sq * p.count for p in parts]).sum(0), count])
        flat = group.all_reduce(flat, "vae")  # (2 C + 1,) sums over every rank's cores
        return group_stats(flat[:c] / flat[-1], flat[c:2 * c] / flat[-1], groups)
    return pooled


def run_tiles(tiles: list[Tile], start: Callable, write: Callable, *, stats: list[GroupStats] | None,
              lot=None, on_tile=None, group=None) -> int | None:
    """Every tile's path to its end: in lock step (stats None, exact) or alone on fixed `stats`.

    `start(tile, ctx)` returns the tile's generator (blocks.decoder_tile/encoder_tile on its
    window); `write(tile, result)` stores each finished tile's core; `on_tile(done, total)`
    counts them. Returns the GroupNorm rounds of the lock step (None with fixed stats).
    group (parallel.BandGroup, handed in): `tiles` are this rank's share, and the lock step pools
    the moments of every rank's tiles (every rank has some, all with the same GroupNorms).
    lot (parking.Lot, exact mode only): where paused tiles wait, keyed by their index in `tiles`;
    with fixed stats a tile never waits for another, so nothing is parked.
    """
    done = 0

    def job(i: int):
        t = tiles[i]
        ctx = TileCtx((*t.y.core_in_window, *t.x.core_in_window), (t.y.win_len, t.x.win_len),
                      lot if stats is None else None, i)
        return start(t, ctx)

    def finish(i: int, result) -> None:
        nonlocal done
        write(tiles[i], result)
        done += 1
        if on_tile:
            on_tile(done, len(tiles))

    if stats is None:
        return run_lockstep(((i, job(i)) for i in range(len(tiles))), finish,
                            pool if group is None else shared_pool(group))
    for i in range(len(tiles)):
        finish(i, run_fixed(job(i), stats))
    return None
