"""The host-memory rules: one RAM reading, the CPU plan's share of it."""

from __future__ import annotations

import pytest

from linfusion_cli import hostmem

GIB = 2 ** 30


@pytest.mark.parametrize("total,free,budget", [(16, 12, 4), (16, 3, 3)])
def test_cpu_plan_budget_is_a_quarter_of_ram_at_most_what_is_free(monkeypatch, total, free, budget):
    monkeypatch.setattr(hostmem, "host_memory", lambda: hostmem.HostMemory(total * GIB, free * GIB))
    assert hostmem.cpu_plan_budget() == budget * GIB


def test_vae_parks_in_half_of_the_plan_budget_or_of_free_ram(monkeypatch):
    monkeypatch.setattr(hostmem, "host_memory", lambda: hostmem.HostMemory(16 * GIB, 6 * GIB))
    assert hostmem.vae_park_budget() == 3 * GIB
    assert hostmem.vae_park_budget(2.5 * GIB) == int(1.25 * GIB)


def test_host_memory_reads_the_machine():
    mem = hostmem.host_memory()
    assert 0 < mem.available <= mem.total
