"""The band-wise plans: the estimate against a meta-device trace of the banded forward, the
planner's choice of band_rows, the memory targets as dry runs, and the host-memory check."""

from __future__ import annotations

import pytest

from linfusion_cli.errors import PlanError
from linfusion_cli.planning.memory import estimate as est
from linfusion_cli.planning.memory.planner import MemoryPlan, choose_knobs, load_family_configs
from linfusion_cli.tracing.unet import meta_unet, trace_unet_bytes

GIB = 1 << 30

# a covering set: each family; parked or held skips; guidance split or not; chunked or not
TRACE_CASES = [
    ("sd15", 32, dict(cfg_split=True, skips_on_cpu=True, inplace=True)),
    ("sd15", 64, dict(ff_chunk=4096)),
    ("sd21", 48, dict(cfg_split=True, ff_chunk=4096, skips_on_cpu=True)),
    ("sdxl", 32, dict(skips_on_cpu=True, inplace=True)),
    ("sdxl", 64, dict(cfg_split=True)),
]


@pytest.mark.parametrize("family,rows,knobs", TRACE_CASES)
@pytest.mark.slow  # a full-size meta trace or several runs: not the quick tier
def test_banded_estimate_within_5_percent_of_the_trace(family, rows, knobs):
    unet_cfg, _ = load_family_configs(family)
    plan = MemoryPlan(offload="model", attn_chunk=65536, band_rows=rows, **knobs)
    traced = trace_unet_bytes(unet_cfg, width=2048, height=2048, knobs=plan,
                              unet=meta_unet(unet_cfg, linfusion=True))
    estimated = est.unet_activation_bytes(unet_cfg, latent_h=256, latent_w=256, batch=2,
                                          dtype_bytes=2, knobs=plan)
    assert 0.95 <= estimated / traced <= 1.05, (estimated / GIB, traced / GIB)


def test_planner_uses_bands_only_when_the_budget_needs_them():
    unet_cfg, vae_cfg = load_family_configs("sd15")
    loose = choose_knobs(unet_cfg, vae_cfg, width=2048, height=2048, dtype_bytes=2,
                         budget_bytes=40 * GIB)
    assert loose.band_rows == 0
    tight = choose_knobs(unet_cfg, vae_cfg, width=16384, height=16384, dtype_bytes=2,
                         budget_bytes=12 * GIB)
    assert tight.band_rows > 0 and tight.estimated_peak_gib <= 12
    with pytest.raises(PlanError, match="LinFusion"):
        choose_knobs(unet_cfg, vae_cfg, width=4096, height=4096, dtype_bytes=2,
                     budget_bytes=40 * GIB, linfusion=False, fixed={"band_rows": 32})


@pytest.mark.parametrize("args,budget", [
    (("--res", "16384"), 12), (("--res", "16384", "--aspect", "2:1"), 8),
    (("--res", "32768", "--aspect", "2:1"), 24), (("--res", "16384"), 24),
    (("--res", "16384", "--model", "stabilityai/stable-diffusion-xl-base-1.0"), 16),
])
def test_memory_targets_plan_within_the_budget(cli, args, budget):
    """The family's preset ladder, guidance on, every stage (VAE phase included) in budget."""
    import json

    r = cli("generate", "a lighthouse", *args, "--max-vram", str(budget), "--dry-run", "--json")
    assert r.code == 0, r.err
    plan = json.loads(r.out_lines[0])
    assert all(s["memory"]["estimated_peak_gib"] <= budget for s in plan["stages"])
    assert all(s["guidance"] > 1 for s in plan["stages"])
    assert plan["stages"][-1]["memory"]["band_rows"] > 0
    assert plan["stages"][-1]["memory"]["estimated_host_gib"] >= 1  # parked skips, images


def test_host_memory_refused_before_loading(cli, monkeypatch):
    """A run whose parked skips and images need more RAM than is free: one line, exit 2."""
    from linfusion_cli import hostmem

    monkeypatch.setattr(hostmem, "host_memory", lambda: hostmem.HostMemory(8 << 20, 4 << 20))
    r = cli("generate", "a lighthouse", "--model", "demo", "--res", "2048", "--steps", "20",
            "--max-vram", "40")
    assert r.code == 2
    assert "GiB of host memory" in r.err and len(r.err.strip().splitlines()) == 1
