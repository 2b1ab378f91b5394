"""Host RAM: the one place that reads it (psutil) and the shares of it the code may plan with.

Tests that fake the machine's RAM patch `host_memory` here, and nothing else.
"""

from __future__ import annotations

from typing import NamedTuple

# On the CPU device the memory plan gets this share of total RAM (at most what is free): the
# planner does not count the full-size images, the resize or the PNG encoder, so room is left.
CPU_PLAN_SHARE = 0.25
CPU_PLAN_SHARE_WORDS = "a quarter of RAM"  # how a refusal names CPU_PLAN_SHARE
# The tiled VAE's exact mode parks paused tiles in host RAM, up to this share of what is free
# (of the plan's budget on the CPU device): the rest is the UNet's and the images'.
VAE_PARK_SHARE = 0.5


class HostMemory(NamedTuple):
    """Host RAM in bytes: installed, and free to allocate now (psutil's 'available')."""

    total: int
    available: int


def host_memory() -> HostMemory:
    """The machine's RAM now; the only psutil memory read in the package."""
    import psutil

    vm = psutil.virtual_memory()
    return HostMemory(int(vm.total), int(vm.available))


def cpu_plan_budget() -> int:
    """Bytes the memory plan may use on the CPU device: CPU_PLAN_SHARE of RAM, at most what is free."""
    mem = host_memory()
    return min(mem.available, int(mem.total * CPU_PLAN_SHARE))


def vae_park_budget(plan_budget: float | None = None) -> int:
    """Bytes the tiled VAE's exact mode may park on the host: a share of the RAM free now, or of
    the plan's budget when given (CPU device) and smaller: a --max-vram above the RAM is no RAM."""
    free = host_memory().available
    base = free if plan_budget is None else min(plan_budget, free)
    return int(base * VAE_PARK_SHARE)
