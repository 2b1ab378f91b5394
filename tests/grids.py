"""Knob grids for the memory-trace tests: a pairwise covering set by default, the full grid
behind the `full_grid` marker (CI runs it once: `python -m pytest -q -m full_grid`)."""

from __future__ import annotations

import itertools

from linfusion_cli.planning.memory.planner import ATTN_CHOICES, FF_CHOICES, MemoryPlan

FACTORS = (FF_CHOICES, (False, True), ATTN_CHOICES["cuda"], (False, True), (False, True))


def _plan(ff, cfg, attn, inp, sk) -> MemoryPlan:
    return MemoryPlan(ff_chunk=ff, cfg_split=cfg, attn_chunk=attn, inplace=inp, skips_on_cpu=sk)


def pairwise(factors) -> list[tuple]:
    """A small set of combinations holding every pair of values of any two factors (greedy:
    each pick covers the most pairs still missing; deterministic)."""
    everything = list(itertools.product(*factors))
    pairs = lambda combo: {(i, combo[i], j, combo[j])  # noqa: E731
                           for i, j in itertools.combinations(range(len(combo)), 2)}
    missing = set().union(*(pairs(c) for c in everything))
    chosen = []
    while missing:
        best = max(everything, key=lambda c: len(pairs(c) & missing))
        chosen.append(best)
        missing -= pairs(best)
    return chosen


FULL = [_plan(*combo) for combo in itertools.product(*FACTORS)]
COVERING = [_plan(*combo) for combo in pairwise(FACTORS)]


def knob_id(k: MemoryPlan) -> str:
    return (f"ff{k.ff_chunk}-cfg{int(k.cfg_split)}-attn{k.attn_chunk}-inp{int(k.inplace)}"
            f"-sk{int(k.skips_on_cpu)}")


def grid(marks=()) -> list:
    """pytest params: the covering set, then the rest of the full grid marked `full_grid`."""
    import pytest

    return ([pytest.param(k, id=knob_id(k), marks=marks) for k in COVERING]
            + [pytest.param(k, id=knob_id(k), marks=(*marks, pytest.mark.full_grid))
               for k in FULL if k not in COVERING])
