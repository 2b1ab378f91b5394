"""On the CPU the device is the host's RAM: --max-vram is checked against the RAM free before
anything loads, a refusal never advises a budget beyond it, and the exact VAE parks within it."""

from __future__ import annotations

import json

import pytest

from linfusion_cli import hostmem

GIB = 2 ** 30
ARGS = ("generate", "a cat", "--model", "demo", "--device", "cpu", "--seed", "1", "-o", "out/x.png")


@pytest.fixture
def ram(monkeypatch):
    """Fake this machine's RAM: ram(total_gib, free_gib)."""
    def fake(total: float, free: float) -> None:
        monkeypatch.setattr(hostmem, "host_memory",
                            lambda: hostmem.HostMemory(int(total * GIB), int(free * GIB)))
    return fake


@pytest.mark.parametrize("dry", [True, False])
def test_max_vram_beyond_the_ram_is_refused_before_loading(cli, tmp_path, ram, dry):
    ram(1, 0.2)
    r = cli(*ARGS, "--res", "2048", "--max-vram", "64", *(["--dry-run"] if dry else []))
    assert r.code == 2 and len(r.err_lines) == 1, r.err
    assert "the device is this machine's RAM" in r.err and "--max-vram 64 is more than the RAM" in r.err
    assert "at most 0.2" in r.err and "loading" not in r.err
    assert not (tmp_path / "out").exists()


def test_a_budget_within_the_ram_plans_and_runs(cli, ram):
    ram(64, 48)
    r = cli(*ARGS, "--res", "128", "--max-vram", "8", "--dry-run", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["budget"] == {"gib": 8, "source": "--max-vram"}


def test_refusal_never_advises_more_than_the_ram(cli, ram):
    ram(0.2, 0.05)  # a quarter of RAM is far too small, and so is all of it
    r = cli(*ARGS, "--res", "2048", "--dry-run")
    assert r.code == 2 and len(r.err_lines) == 1, r.err
    assert "0.1 GiB of RAM free" in r.err or "0.0 GiB of RAM free" in r.err
    assert "no --max-vram makes it fit on the CPU" in r.err and "allow more" not in r.err


def test_the_exact_vae_parks_within_the_free_ram_not_max_vram(cli, ram):
    ram(8, 2)
    r = cli(*ARGS, "--res", "256", "--max-vram", "1.5", "--vae-tile", "64", "--dry-run", "--json")
    assert r.code == 0, r.err
    assert {s["memory"]["vae_host_gib"] for s in json.loads(r.out)["stages"]} == {0.75}
    assert hostmem.vae_park_budget(64 * GIB) == 1 * GIB, "half of the 2 GiB free, not of 64"
