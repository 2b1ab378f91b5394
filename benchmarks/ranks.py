"""Time one unit of work (a UNet step, a VAE decode) on N single-thread CPU processes joined in a
gloo group, for the band-parallel benchmarks: a warm-up, then the fastest of `repeat` runs,
each between barriers, so every count is timed the same way side by side."""

from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, nprocs: int, store: str, setup, args, out: str) -> None:
    """One rank: step = setup(rank, nprocs, args) (a module-level function), then the runs."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=nprocs)
    step = setup(rank, nprocs, args)
    times, cpu = [], []
    for i in range(args.repeat + 1):
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        kept = step()  # a dict of what the benchmark reports (the last run's)
        used = time.process_time() - start_cpu
        dist.barrier()
        if i:
            times.append(time.perf_counter() - start)
            cpu.append(used)
    torch.save({"seconds": min(times), "cpu": min(cpu), **kept}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def timed(nprocs: int, setup, args) -> dict:
    """The slowest rank's seconds and CPU seconds, and every rank's saved dict (`ranks`)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(nprocs, os.path.join(tmp, "store"), setup, args, tmp),
                 nprocs=nprocs, join=True)
        ranks = [torch.load(f"{tmp}/{r}.pt", weights_only=False) for r in range(nprocs)]
    return {"seconds": max(r["seconds"] for r in ranks), "cpu": max(r["cpu"] for r in ranks),
            "ranks": ranks}


def add_arguments(parser, repeat: int) -> None:
    """--procs and --repeat, as both benchmarks take them."""
    parser.add_argument("--procs", default="1,2,3", help="process counts to time")
    parser.add_argument("--repeat", type=int, default=repeat,
                        help="timed runs per count (the fastest is kept)")


def each_count(setup, args) -> dict[int, dict]:
    """timed() for every count of --procs, in order, one thread per process."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return {n: timed(n, setup, args) for n in (int(p) for p in args.procs.split(","))}


def speed(n: int, result: dict, base: dict, unit: str) -> str:
    """'  N processes: s/unit, wall speed-up; CPU time of the busiest rank (x less)'."""
    return (f"  {n} process{'es' if n > 1 else ''}: {result['seconds']:.2f} s/{unit}, speed-up "
            f"{base['seconds'] / result['seconds']:.2f}x; CPU time of the busiest rank "
            f"{result['cpu']:.2f} s ({base['cpu'] / result['cpu']:.2f}x less)")
