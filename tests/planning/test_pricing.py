"""Plans ranked by predicted time: the GPU table, the time model, the frontier of fitting plans."""

from __future__ import annotations

import json

import pytest

from linfusion_cli.errors import PlanError
from linfusion_cli.gpus import GPUS, Seconds, detected_gpu, gpu_named, predict
from linfusion_cli.planning.cost import Cost, StageCost, offload_cost
from linfusion_cli.planning.memory.planner import (
    _Estimator, candidate_plans, choose_knobs, frontier, load_family_configs, LOOSEST_FIRST,
    KNOB_NAMES)
from linfusion_cli import validate

GIB = 1 << 30


def test_every_named_gpu_is_priced_at_most_half_its_datasheet_rate():
    for name in ("h100", "a100", "l40s", "rtx4090", "rtx3090", "rtx3060", "t4"):
        gpu = GPUS[name]
        assert gpu.sustained_flops <= 0.5 * gpu.dense_tflops * 1e12
        assert gpu.pinned_bps > gpu.pageable_bps > 0
    assert not GPUS["t4"].bf16 and GPUS["a100"].bf16


def test_gpu_names_are_forgiving_and_unknown_ones_refused():
    assert gpu_named("RTX 4090").name == "rtx4090"
    assert validate.gpu("H100") == "h100"
    with pytest.raises(PlanError, match="known: h100"):
        gpu_named("voodoo2")
    assert detected_gpu("NVIDIA GeForce RTX 3060", 12.0).name == "rtx3060"
    odd = detected_gpu("Some Future GPU", 40.0)  # priced like the largest table entry below 41 GiB
    assert odd.name == "Some Future GPU" and odd.dense_tflops == GPUS["rtx4090"].dense_tflops


def test_overlapped_parts_take_the_longest_blocking_parts_add():
    gpu = GPUS["h100"]
    compute = Cost(flops=int(gpu.sustained_flops))  # 1 s of compute
    assert predict(compute, gpu).predicted_s == pytest.approx(1.0)
    pinned = Cost(h2d_bytes=int(gpu.pinned_bps / 2))  # 0.5 s of async copy: hidden
    assert predict(compute + pinned, gpu).predicted_s == pytest.approx(1.0)
    pageable = Cost(h2d_bytes=int(gpu.pageable_bps), blocking_bytes=int(gpu.pageable_bps))
    assert predict(compute + pageable, gpu).predicted_s == pytest.approx(2.0)
    launches = Cost(launches=int(3 / gpu.launch_s))  # 3 s of dispatch: launch-bound
    assert predict(compute + launches, gpu).predicted_s == pytest.approx(3.0)


def test_offload_moves_weights_once_per_stage_or_every_call():
    w = {"unet": 100, "vae": 10, "text": 5}
    assert offload_cost("none", w, 7) == Cost()
    assert offload_cost("model", w, 7).h2d_bytes == 115
    assert offload_cost("sequential", w, 7).h2d_bytes == 7 * 100 + 15


def _fitting(budget_gib, width=16384, height=16384):
    u, v = load_family_configs("sd15")
    estimate = _Estimator(u, v, width=width, height=height, dtype_bytes=2, guidance=True,
                          linfusion=True, device="cuda")
    return [p for p in candidate_plans(width, height) if estimate(p) <= budget_gib * GIB]


def _looser_or_equal(a, b) -> bool:
    """a is at least as loose as b in every knob."""
    return all(LOOSEST_FIRST[n].index(getattr(a, n)) <= LOOSEST_FIRST[n].index(getattr(b, n))
               for n in KNOB_NAMES)


@pytest.mark.parametrize("budget", [16, 24])
def test_the_frontier_holds_a_plan_as_loose_as_every_fitting_plan(budget):
    fitting = _fitting(budget)
    front = frontier(fitting)
    assert 1 <= len(front) < len(fitting) / 10
    for p in fitting:  # whatever the price, if looser is never slower, the best is on the front
        assert any(_looser_or_equal(f, p) for f in front)
    for f in front:  # and nothing on it can be loosened in one knob
        assert not any(q is not f and _looser_or_equal(q, f) and q.knobs() != f.knobs() for q in fitting)


def test_the_price_decides_between_incomparable_plans():
    """At 24 GiB for 16384^2 the frontier offers skips parked on the host, or CFG halves: a price
    that makes PCIe expensive and one that makes launches expensive pick different plans."""
    u, v = load_family_configs("sd15")
    args = dict(width=16384, height=16384, dtype_bytes=2, budget_bytes=24 * GIB)
    pcie_dear = choose_knobs(u, v, price=lambda p: float(p.skips_on_cpu), **args)
    launches_dear = choose_knobs(u, v, price=lambda p: float(p.cfg_split), **args)
    assert not pcie_dear.skips_on_cpu and pcie_dear.cfg_split
    assert launches_dear.skips_on_cpu and not launches_dear.cfg_split


def test_stage_cost_sums_its_phases():
    gpu = GPUS["rtx3060"]
    sc = StageCost({"unet": Cost(flops=10 ** 15), "vae_decode": Cost(flops=10 ** 14)}, gpu)
    d = sc.to_dict()
    assert d["flops"] == 11 * 10 ** 14
    assert d["predicted_s"] == pytest.approx(sc.seconds(), abs=1e-3)
    assert d["compute_s"] == pytest.approx(11 * 10 ** 14 / gpu.sustained_flops, abs=1e-3)


@pytest.mark.slow  # a full-size meta trace or several runs: not the quick tier
def test_dry_run_prices_the_plan_for_the_named_gpu(cli):
    r = cli("generate", "a boat", "--res", "1024", "--gpu", "rtx3060", "--dry-run", "--json")
    assert r.code == 0, r.err
    plan = json.loads(r.out)
    assert plan["gpu"] == "rtx3060" and plan["budget"]["gib"] == 12  # its memory: the budget
    costs = [s["cost"] for s in plan["stages"]]
    for c in costs:
        assert set(c) >= {"flops", "host_to_device_bytes", "device_to_host_bytes", "launches",
                          "syncs", "compute_s", "predicted_s"}
        assert c["predicted_s"] >= c["compute_s"] > 0
    assert plan["predicted_s"] == pytest.approx(sum(c["predicted_s"] for c in costs), abs=0.02)
    text = cli("generate", "a boat", "--res", "1024", "--gpu", "rtx3060", "--dry-run")
    assert "priced for rtx3060: predicted" in text.out and "(not measured)" in text.out


def test_an_unknown_gpu_is_one_line(cli):
    r = cli("generate", "a boat", "--gpu", "voodoo2", "--dry-run")
    assert r.code == 2 and len(r.err_lines) == 1 and "voodoo2" in r.err


def test_a_rank_waits_for_its_peers_messages():
    """Band parallelism: halos, sums and states a rank waits on add to its time (not overlapped)."""
    gpu = GPUS["h100"]
    compute = Cost(flops=int(gpu.sustained_flops))  # 1 s
    wire = Cost(link_bytes=int(gpu.link_bps / 4), messages=4000)  # 0.25 s + 4000 messages
    assert predict(compute + wire, gpu).predicted_s == pytest.approx(1.25 + 4000 * 25e-6)
    assert GPUS["h100"].link_bps > 5 * GPUS["rtx4090"].link_bps  # NVLink against PCIe


@pytest.mark.slow  # a full-size meta trace or several runs: not the quick tier
def test_a_band_parallel_plan_is_priced_per_rank(cli):
    """--world-size 2: each stage is one rank's half of the UNet's work plus its messages."""
    base = ("generate", "a boat", "--res", "1024", "--gpu", "h100", "--dry-run", "--json")
    one, two = (json.loads(cli(*base, *extra).out) for extra in ((), ("--world-size", "2")))
    for alone, rank in zip(one["stages"], two["stages"]):
        a, r = alone["cost"]["phases"]["unet"], rank["cost"]["phases"]["unet"]
        assert a["link_bytes"] == 0 < r["link_bytes"] and r["messages"] > 0
        assert 0.45 < r["flops"] / a["flops"] < 0.56, (alone["width"], r["flops"] / a["flops"])
    assert two["stages"][-1]["cost"]["peer_bytes"] > 0


def test_a_plan_on_the_gpu_here_is_priced_as_that_gpu(monkeypatch):
    """The CUDA-only path of pricing_gpu, forced on the CPU: no --gpu, a GPU in this machine."""
    import dataclasses

    import torch

    from linfusion_cli.planning.memory.fit import pricing_gpu

    from ..model_helpers import CudaProperties
    from linfusion_cli.planning.request import Request, make_plan

    seen = []
    props = CudaProperties(name="NVIDIA GeForce RTX 4090", total_memory=24 * GIB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: seen.append(d) or props)
    plan = dataclasses.replace(make_plan(Request(prompt="x", model="demo", res=64)), device="cuda:1",
                               planned_elsewhere=False, gpu=None)
    assert pricing_gpu(plan) is GPUS["rtx4090"] and seen == [torch.device("cuda:1")]
    assert pricing_gpu(dataclasses.replace(plan, gpu="h100")) is GPUS["h100"]  # --gpu wins
    assert pricing_gpu(dataclasses.replace(plan, planned_elsewhere=True)) is None  # absent, unnamed
