"""The printed plan is the plan for the model and GPU it names (dry runs, budgets, forced knobs)."""

from __future__ import annotations

import json

import pytest

from ..cli_helpers import write_preset

GIB = 2 ** 30


def _plan(result) -> dict:
    assert result.code == 0, result.err
    return json.loads(result.out)


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_sdxl_16k_for_a_24_gib_gpu_without_a_gpu(cli, no_cuda):
    plan = _plan(cli("generate", "x", "--model", "stabilityai/stable-diffusion-xl-base-1.0",
                     "--width", "16384", "--height", "8192", "--max-vram", "24", "--dry-run", "--json"))
    assert (plan["family"], plan["device"], plan["dtype"], plan["vae_dtype"]) == ("sdxl", "cuda", "fp16", "bf16")
    assert plan["planned_elsewhere"] and plan["extras"]["preset"] == "sdxl"
    assert all(s["memory"]["estimated_peak_gib"] <= 24 for s in plan["stages"])
    assert (plan["width"], plan["height"]) == (16384, 8192)


def test_published_sd15_recipe_within_24_gib(cli, no_cuda):
    plan = _plan(cli("generate", "x", "--preset", "sd15", "--width", "16384", "--height", "8192",
                     "--max-vram", "24", "--dry-run", "--json"))
    assert [(s["width"], s["height"], s["strength"]) for s in plan["stages"]] == [
        (1024, 512, None), (2048, 1024, 0.4), (4096, 2048, 0.3), (8192, 4096, 0.2), (16384, 8192, 0.1)]
    assert all(s["memory"]["estimated_peak_gib"] <= 24 for s in plan["stages"])


def test_first_line_says_what_was_planned_for(cli, no_cuda):
    r = cli("generate", "x", "--res", "4096", "--max-vram", "24", "--dry-run")
    assert r.code == 0, r.err
    first = r.out_lines[0]
    assert first.startswith("planned for cuda (no GPU on this machine") and "24 GiB (--max-vram)" in first
    assert "UNet fp16" in first


def test_device_cuda_dry_run_needs_no_cuda(cli, no_cuda):
    plan = _plan(cli("generate", "x", "--res", "4096", "--device", "cuda", "--dry-run", "--json"))
    assert plan["device"] == "cuda" and plan["budget"] == {"gib": None, "source": "none"}
    r = cli("generate", "x", "--res", "512", "--device", "cuda", "--model", "demo")
    assert r.code == 2 and "no CUDA device" in r.err and len(r.err_lines) == 1


def test_forced_vae_tile_changes_the_printed_estimate(cli, no_cuda):
    args = ("generate", "x", "--res", "4096", "--max-vram", "80", "--dry-run", "--json")
    planned, tiled = _plan(cli(*args)), _plan(cli(*args, "--vae-tile", "512"))
    last, last_tiled = planned["stages"][-1]["memory"], tiled["stages"][-1]["memory"]
    assert last["vae_tile_px"] == 0 and last_tiled["vae_tile_px"] == 512  # fastest: untiled
    assert last_tiled["estimated_peak_gib"] < last["estimated_peak_gib"]
    r = cli(*args[:5], "24", "--dry-run", "--vae-tile", "0")  # untiled 4096^2 does not fit 24
    assert r.code == 2 and "vae_tile_px=0" in r.err and "--max-vram 24 is too small" in r.err


def test_preset_memory_knobs_are_planner_constraints(cli, no_cuda, tmp_path):
    preset = write_preset(tmp_path / "p.yaml", "memory:\n  offload: model\n  ff_chunk: 4096\n")
    plan = _plan(cli("generate", "x", "--preset", str(preset), "--res", "2048", "--max-vram", "80",
                     "--dry-run", "--json"))
    assert all(s["memory"]["offload"] == "model" and s["memory"]["ff_chunk"] == 4096
               for s in plan["stages"])
    bad = write_preset(tmp_path / "bad.yaml", "memory:\n  offload: gpu\n")
    r = cli("generate", "x", "--preset", str(bad), "--dry-run")
    assert r.code == 2 and "offload" in r.err and len(r.err_lines) == 1


@pytest.mark.parametrize("flag,quoted", [("2", "--max-vram 2 is too small"),
                                         ("0.5", "--max-vram 0.5 is too small")])
def test_refusals_quote_the_budget_as_given(cli, no_cuda, flag, quoted):
    r = cli("generate", "x", "--res", "16384", "--max-vram", flag, "--dry-run")
    assert r.code == 2 and quoted in r.err and len(r.err_lines) == 1


def test_cpu_refusal_says_where_the_budget_came_from(cli, no_cuda, monkeypatch):
    from linfusion_cli import hostmem

    monkeypatch.setattr(hostmem, "host_memory", lambda: hostmem.HostMemory(8 * GIB, 6 * GIB))
    r = cli("generate", "x", "--res", "8192", "--dry-run")
    assert r.code == 2 and len(r.err_lines) == 1
    assert "no GPU found; on the CPU the budget is a quarter of RAM, 2.0 GiB; this machine has 6.0 GiB" in r.err
    assert "no --max-vram makes it fit on the CPU" in r.err  # never advice beyond the RAM


@pytest.mark.parametrize("value", ["0", "-3", "inf", "nan"])
def test_max_vram_must_be_a_positive_number(cli, value):
    r = cli("generate", "x", "--res", "512", "--max-vram", value, "--dry-run")
    assert r.code == 2 and "--max-vram must be" in r.err and len(r.err_lines) == 1
