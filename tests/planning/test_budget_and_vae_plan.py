"""One budget type from the request to the record, and the tiled VAE's statistics mode decided
with the plan: --dry-run shows it, the run does it, the record reads it back."""

from __future__ import annotations

import json

import pytest

from linfusion_cli import hostmem
from linfusion_cli.io.metadata import read_metadata
from linfusion_cli.planning.budget import Budget

from ..cli_helpers import TINY_PRESET, write_preset

GIB = 2 ** 30


def test_budget_says_where_it_came_from(cli, tmp_path):
    r = cli("generate", "x", "--res", "4096", "--max-vram", "20", "--dry-run", "--json")
    assert json.loads(r.out_lines[0])["budget"] == {"gib": 20.0, "source": "--max-vram"}
    preset = write_preset(tmp_path / "tight.yaml", TINY_PRESET + "max_vram: 16\n")
    r = cli("generate", "x", "--res", "256", "--preset", str(preset), "--dry-run")
    assert r.code == 0, r.err
    assert "16 GiB (preset tight's max_vram)" in r.out_lines[0]
    r = cli("generate", "x", "--res", "16384", "--max-vram", "1", "--dry-run")
    assert r.code == 2 and "--max-vram 1 is too small" in r.err


def test_refusal_tails_name_the_source():
    assert Budget.given(8, "--max-vram").too_small() == "--max-vram 8 is too small"
    assert Budget(3.0, "a quarter of RAM").too_small().startswith("no GPU found; on the CPU the budget is a quarter of RAM, 3.0 GiB")
    assert Budget(7.25, "the free memory of cuda:1").too_small().startswith("the free memory of cuda:1 (7.2 GiB)")


def test_vae_mode_follows_the_host_budget(cli, monkeypatch):
    """Plenty of RAM: exact statistics; almost none: estimated ones, shown before anything runs."""
    args = ("generate", "x", "--model", "demo", "--res", "2048", "--vae-tile", "256", "--max-vram", "4",
            "--dry-run", "--json")  # planned for a GPU: the VAE parks in this machine's free RAM
    monkeypatch.setattr(hostmem, "host_memory", lambda: hostmem.HostMemory(64 * GIB, 48 * GIB))
    last = json.loads(cli(*args).out_lines[0])["stages"][-1]["memory"]
    assert (last["vae_decode_mode"], last["vae_encode_mode"]) == ("exact", "exact")
    monkeypatch.setattr(hostmem, "host_memory", lambda: hostmem.HostMemory(64 * GIB, 1 << 20))
    r = cli(*args)
    assert r.code == 0, r.err
    last = json.loads(r.out_lines[0])["stages"][-1]["memory"]
    assert (last["vae_decode_mode"], last["vae_encode_mode"]) == ("estimated", "estimated")
    text = cli(*args[:-1]).out
    assert "decode estimated, encode estimated" in text


@pytest.mark.slow  # a full-size meta trace or several runs: not the quick tier
def test_the_run_does_the_planned_vae_mode(cli, tmp_path):
    out = tmp_path / "a.png"
    r = cli("generate", "x", "--model", "demo", "--res", "1024", "--steps", "4", "--vae-tile", "256",
            "--seed", "1", "-o", str(out))
    assert r.code == 0, r.err
    record = read_metadata(out)["record"]
    assert record["budget"]["source"] == "a quarter of RAM"
    for stage in record["stages"]:
        planned = stage["memory"]
        for part in ("decode", "encode"):
            ran = stage["vae"].get(part)
            if ran is not None:  # the report of what ran says the planned mode and budget
                assert ran["mode"] == planned[f"vae_{part}_mode"]
                if ran["mode"] != "untiled":
                    assert abs(ran["budget_bytes"] / GIB - planned["vae_host_gib"]) < 0.01
    assert record["stages"][-1]["vae"]["decode"]["mode"] == "exact"
