"""The memory planner: shipped configs, the estimate against published figures, plan choice."""

from __future__ import annotations

from dataclasses import replace

import pytest

from linfusion_cli.errors import InputError, PlanError
from linfusion_cli.planning.memory import estimate as est, walk
from linfusion_cli.models.resolve import bundled_config
from linfusion_cli.planning.memory.planner import (
    GIB,
    MemoryPlan,
    candidate_plans,
    load_family_configs,
    choose_knobs,
)

FAMILIES = ("sd15", "sd21", "sdxl")


@pytest.fixture(scope="module")
def configs():
    return {f: load_family_configs(f) for f in FAMILIES}


def _plan(configs, family, size, gib, **kw):
    unet, vae = configs[family]
    return choose_knobs(unet, vae, width=size, height=size, dtype_bytes=2,
                       budget_bytes=int(gib * GIB), **kw)


# ---------------------------------------------------------------- shipped configs

@pytest.mark.parametrize("family,unet_params", [
    ("sd15", 859_520_964), ("sd21", 865_910_724), ("sdxl", 2_567_463_684)])
def test_shipped_configs_build_and_have_the_published_sizes(configs, family, unet_params):
    unet, vae = configs[family]
    assert est.param_count("unet", unet, use_known=False) == unet_params  # meta instantiation
    assert est.param_count("unet", unet) == unet_params  # the table a dry run uses
    assert est.param_count("vae", vae, use_known=False) == est.param_count("vae", vae) == 83_653_863


def test_family_specifics(configs):
    assert bundled_config("sd21", "scheduler")["prediction_type"] == "v_prediction"
    assert configs["sd21"][0]["attention_head_dim"] == [5, 10, 20, 20]
    sdxl_vae = configs["sdxl"][1]
    assert sdxl_vae["force_upcast"] is True and sdxl_vae["scaling_factor"] == 0.13025
    assert configs["sd15"][1]["scaling_factor"] == 0.18215
    assert configs["sdxl"][0]["transformer_layers_per_block"] == [1, 2, 10]
    with pytest.raises(InputError, match="sd15, sd21, sdxl"):
        load_family_configs("flux")


def test_weight_bytes(configs):
    w = est.weight_bytes(*configs["sd15"], dtype_bytes=2)
    assert w["unet"] == pytest.approx(1.72e9, rel=0.01)  # 859.5M params in fp16
    assert w["vae"] == pytest.approx(0.167e9, rel=0.01)
    assert w["text"] == pytest.approx(0.246e9, rel=0.01)  # CLIP ViT-L/14 text model
    wx = est.weight_bytes(*configs["sdxl"], dtype_bytes=2)
    assert wx["unet"] == pytest.approx(5.13e9, rel=0.01) and wx["vae"] == 2 * 83_653_863  # bf16
    assert est.weight_bytes(*configs["sdxl"], dtype_bytes=2, vae_bytes=4)["vae"] == 4 * 83_653_863


# ---------------------------------------------------------------- the estimate

def test_chunked_linfusion_holds_only_its_input_and_output(configs):
    """With attn_chunk, LinFusion's working set is its output plus O(chunk), not q/k/v/o (6C)."""
    unet = configs["sd15"][0]
    kw = {"latent_h": 1024, "latent_w": 2048, "batch": 1, "dtype_bytes": 2}
    full = walk._transformer(320, 1024 * 2048, est.Knobs(ff_chunk=4096), True, 2, None)
    chunked = walk._transformer(320, 1024 * 2048, est.Knobs(ff_chunk=4096, attn_chunk=4096),
                               True, 2, None)
    assert full >= 8 * 320 and chunked <= 7.05 * 320  # the cross-attention moment now sets it
    assert (est.unet_activation_bytes(unet, knobs=est.Knobs(ff_chunk=4096, attn_chunk=4096), **kw)
            < est.unet_activation_bytes(unet, knobs=est.Knobs(ff_chunk=4096), **kw))


def test_breakdown_adds_up_and_names_the_peak(configs):
    knobs = est.Knobs(vae_tile_px=1024, ff_chunk=4096, cfg_split=True, attn_chunk=4096,
                      inplace=True, skips_on_cpu=True)
    b = est.peak_breakdown(*configs["sd15"], width=16384, height=8192, knobs=knobs)
    phase = max(b["unet_weights"] + b["unet_activations"], b["vae_weights"] + b["vae_activations"])
    assert b["total"] == phase + b["margin"] + b["context"]
    assert sum(b["unet_terms"].values()) == pytest.approx(b["unet_activations"], abs=64)
    assert b["phase"] == "unet" and b["unet_moment"].startswith("up3.attn")  # last up block
    unit = 1024 * 2048 * 2  # one channel of the level-0 latent, fp16, batch 1
    assert b["unet_terms"]["consumed skip (device copy)"] == 320 * unit  # only one skip
    assert b["unet_terms"]["up block input (caller's sample)"] == 640 * unit
    assert "resnet" in est.format_breakdown(est.peak_breakdown(
        *configs["sdxl"], width=16384, height=16384, knobs=knobs))


def test_sd15_16k_fits_24_gib_without_sequential_offload(configs):
    """The issue's target: SD1.5 at 16384x8192 inside 24 GiB without per-layer offload."""
    unet, vae = configs["sd15"]
    plan = choose_knobs(unet, vae, width=16384, height=8192, dtype_bytes=2, budget_bytes=24 * GIB)
    assert plan.offload != "sequential" and plan.attn_chunk  # bands or the CFG split, not PCIe
    assert plan.estimated_peak_gib <= 24


# ---------------------------------------------------------------- plan choice

@pytest.mark.slow  # a full-size meta trace or several runs: not the quick tier
def test_smaller_budget_never_gets_a_looser_plan(configs):
    for family in ("sd15", "sdxl"):
        for size in (2048, 8192):
            order = {p: i for i, p in enumerate(candidate_plans(size, size))}
            last = -1
            for tenth in range(1000, 30, -5):  # 100 GiB down to 3.5 GiB
                try:
                    plan = _plan(configs, family, size, tenth / 10)
                except PlanError:
                    last = len(order)
                    continue
                assert last < len(order), "a smaller budget fitted after a refusal"
                assert plan.estimated_peak_gib <= tenth / 10
                rank = order[MemoryPlan(**{**plan.to_dict(), "estimated_peak_gib": 0.0})]
                assert rank >= last, (family, size, tenth)
                last = rank


def test_sensible_plans(configs):
    roomy = _plan(configs, "sd15", 4096, 80)
    assert roomy.offload == "none" and not roomy.cfg_split and not roomy.skips_on_cpu
    assert _plan(configs, "sd15", 16384, 80).offload == "none"  # the published 80 GB run
    assert _plan(configs, "sdxl", 8192, 24).offload != "sequential"
    tight = _plan(configs, "sdxl", 4096, 8)
    assert tight.offload != "none" or tight.cfg_split
    with pytest.raises(PlanError, match=r"needs at least \d+\.\d GiB for 16384x16384.*budget is 8 GiB"):
        _plan(configs, "sd15", 16384, 8)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_refusal_names_a_budget_that_works(configs, family):
    with pytest.raises(PlanError) as info:
        _plan(configs, family, 16384, 6)
    needed = float(str(info.value).split("needs at least ")[1].split(" GiB")[0])
    plan = _plan(configs, family, 16384, needed + 0.1)
    assert plan.estimated_peak_gib <= needed + 0.1 and plan.band_rows  # bands make it fit


def test_cpu_plans_never_offload(configs):
    for gib in (4, 8, 16, 64):
        try:
            plan = _plan(configs, "sd15", 4096, gib, device="cpu")
        except PlanError:
            continue
        assert plan.offload == "none" and not plan.skips_on_cpu


def test_no_guidance_and_no_linfusion_drop_their_knobs(configs):
    plans = candidate_plans(4096, 4096, guidance=False, linfusion=False)
    assert not any(p.cfg_split or p.attn_chunk for p in plans)
    assert all(p.vae_tile_px < 1024 for p in candidate_plans(1024, 1024) if p.vae_tile_px)


def test_tighter_ladder_ends_at_sequential_and_never_raises_the_estimate(configs):
    plan, steps = MemoryPlan(), []
    while plan is not None:
        steps.append(plan)
        plan = plan.tighter()
    assert steps[-1].offload == "sequential" and steps[-1].skips_on_cpu
    peaks = [est.estimate_peak_bytes(*configs["sd15"], width=8192, height=8192, dtype_bytes=2,
                                     knobs=p.knobs()) for p in steps]
    assert peaks == sorted(peaks, reverse=True)
    assert MemoryPlan(offload="sequential").tighter(device="cpu").offload == "sequential"
    cpu_last = MemoryPlan()
    while (nxt := cpu_last.tighter(device="cpu")) is not None:
        cpu_last = nxt
    assert cpu_last.offload == "none" and not cpu_last.skips_on_cpu


def _ladder(plan, **kw):
    steps = [plan]
    while (plan := plan.tighter(**kw)) is not None:
        steps.append(plan)
    return steps


def test_a_retry_aimed_at_a_phase_tightens_only_that_phases_knobs():
    unet = _ladder(MemoryPlan(attn_chunk=16384), device="cuda", phase="unet", long_side=8192)
    assert {p.vae_tile_px for p in unet} == {0}
    assert unet[-1].ff_chunk == 4096 and unet[-1].cfg_split and unet[-1].band_rows == 16
    vae = _ladder(MemoryPlan(attn_chunk=16384), device="cuda", phase="vae_decode", long_side=3000)
    assert [p.vae_tile_px for p in vae][:3] == [0, 2048, 1024] and vae[-1].vae_tile_px == 64
    assert vae[-1].offload == "model" and vae[-1].knobs() == replace(
        MemoryPlan(attn_chunk=16384), vae_tile_px=64, inplace=True, offload="model").knobs()
    banded = _ladder(MemoryPlan(attn_chunk=16384), device="cuda", phase="unet", banded=True)
    assert all(p.offload != "sequential" for p in banded)  # the bands read weights directly


def test_plan_dict_round_trip():
    plan = MemoryPlan(offload="model", vae_tile_px=2048, ff_chunk=4096, cfg_split=True,
                      estimated_peak_gib=11.5)
    assert MemoryPlan(**plan.to_dict()) == plan


def test_plan_validates_its_knobs():
    with pytest.raises(PlanError, match="offload"):
        MemoryPlan(offload="disk")
    with pytest.raises(PlanError, match="ff_chunk"):
        MemoryPlan(ff_chunk=-1)


def test_the_fastest_plan_that_also_fits_the_host_wins():
    """A plan whose host memory this machine lacks gives way to the next fastest that fits both;
    when none does, the GPU's choice stands (and the request refuses it for the host)."""
    from linfusion_cli.planning.memory.planner import choose_knobs, load_family_configs

    unet, vae = load_family_configs("sd15")
    args = dict(width=4096, height=4096, dtype_bytes=2, budget_bytes=8 * 2 ** 30, device="cuda")
    first = choose_knobs(unet, vae, **args)
    other = choose_knobs(unet, vae, **args, host_fits=lambda m: m.knobs() != first.knobs())
    assert other.knobs() != first.knobs() and other.estimated_peak_gib <= 8
    assert other.slowdown() >= first.slowdown()
    assert choose_knobs(unet, vae, **args, host_fits=lambda m: False) == first
