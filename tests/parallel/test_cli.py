"""`torchrun -m linfusion_cli generate/upscale` over 2 and 3 CPU processes (gloo): one image,
band-parallel, equal to the single-process image within 1 uint8 level; rank 0 alone writes and
prints; a rank that dies or hangs stops the others with one line and no file; the dry run plans
per rank."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from linfusion_cli.io.metadata import read_metadata

from ..cli_helpers import files_under, run_subprocess
from .test_world import TORCHRUN, free_port

HOOKS = {"LINFUSION_TEST_HOOKS": "1"}


def _torchrun(env, nproc: int, *args) -> subprocess.CompletedProcess:
    return run_subprocess([TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), "-m", "linfusion_cli",
                           *map(str, args)], dict(env, OMP_NUM_THREADS="1"))


def _single(env, *args) -> subprocess.CompletedProcess:
    return run_subprocess([sys.executable, "-m", "linfusion_cli", *map(str, args)],
                          dict(env, OMP_NUM_THREADS="1"))


def _by_hand(env, size: int, *args, extra_env=None) -> list[subprocess.Popen]:
    """The ranks without torchrun's agent (a dead rank then does not take the others down)."""
    port = str(free_port())
    return [subprocess.Popen([sys.executable, "-m", "linfusion_cli", *map(str, args)],
                             env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(size),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
                                      **(extra_env or {})),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for r in range(size)]


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=int)


def _preset(tmp_path, family: str, method: str) -> str:
    path = tmp_path / f"{family}-{method}.yaml"
    path.write_text(f"family: {family}\nnative: 64\nsteps: 4\nstrengths: [0.5]\nmethod: {method}\n")
    return str(path)


@pytest.fixture
def controlnet(tmp_path):
    """A tiny SD1.5 ControlNet folder (demo-sized) and a control image."""
    from diffusers import UNet2DConditionModel

    from linfusion_cli.models.tiny import DEMO_UNET_CONFIGS

    from ..adapter_helpers import save_tiny_controlnet

    torch.manual_seed(0)
    folder = save_tiny_controlnet(tmp_path / "cn", UNet2DConditionModel(**DEMO_UNET_CONFIGS["sd15"]))
    image = tmp_path / "edges.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(image)
    return ("--controlnet", str(folder), "--control-image", str(image))


@pytest.mark.slow
def test_sd15_sdedit_with_controlnet_over_2_ranks_equals_one_process(cli_env, tmp_path, controlnet):
    args = ["generate", "a lighthouse", "--model", "demo", "--preset", _preset(tmp_path, "sd15", "sdedit"),
            "--width", "128", "--height", "128", "--seed", "7", "--vae-tile", "64", *controlnet, "--json"]
    one = _single(cli_env, *args, "-o", tmp_path / "one.png")
    assert one.returncode == 0, one.stderr.decode()[-2000:]
    two = _torchrun(cli_env, 2, *args, "-o", tmp_path / "two.png")
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    lines = two.stdout.decode().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["path"] == str(tmp_path / "two.png")  # rank 0 only
    assert np.abs(_pixels(tmp_path / "one.png") - _pixels(tmp_path / "two.png")).max() <= 1
    record = read_metadata(tmp_path / "two.png")["record"]
    assert record["parallel"] == {"mode": "bands", "world_size": 2}
    assert "parallel" not in read_metadata(tmp_path / "one.png")["record"]
    decoded = record["stages"][1]["vae"]["decode"]
    assert decoded["tiles"] >= 2 and decoded["ranks"] == 2 and decoded["mode"] == "exact"  # shared
    assert "ranks" not in read_metadata(tmp_path / "one.png")["record"]["stages"][1]["vae"]["decode"]
    assert sorted(p.name for p in files_under(tmp_path) if p.suffix == ".png") == ["edges.png", "one.png", "two.png"]


@pytest.mark.slow
def test_sdxl_demofusion_over_3_ranks_equals_one_process(cli_env, tmp_path):
    """Unequal bands (3 ranks), the dilated pass's wider halos, SD-XL's two downsamplers."""
    args = ["generate", "a lighthouse", "--model", "demo-sdxl", "--preset", _preset(tmp_path, "sdxl", "demofusion"),
            "--width", "128", "--height", "320", "--seed", "7", "--vae-tile", "64", "-q"]
    one = _single(cli_env, *args, "-o", tmp_path / "one.png")
    assert one.returncode == 0, one.stderr.decode()[-2000:]
    three = _torchrun(cli_env, 3, *args, "-o", tmp_path / "three.png")
    assert three.returncode == 0, three.stderr.decode()[-3000:]
    assert three.stdout.decode().splitlines() == [str(tmp_path / "three.png")]
    assert np.abs(_pixels(tmp_path / "one.png") - _pixels(tmp_path / "three.png")).max() <= 1
    record = read_metadata(tmp_path / "three.png")["record"]
    assert record["parallel"] == {"mode": "bands", "world_size": 3}
    assert [s["method"] for s in record["stages"]] == [None, "demofusion"]
    assert record["stages"][1]["vae"]["decode"]["ranks"] == 3


@pytest.mark.slow
def test_upscale_over_2_ranks_equals_one_process(cli_env, tmp_path):
    source = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(1).random((64, 48, 3)) * 255).astype(np.uint8)).save(source)
    args = ["upscale", source, "a lighthouse", "--model", "demo", "--preset", _preset(tmp_path, "sd15", "sdedit"),
            "--res", "128", "--seed", "3", "-q"]
    one = _single(cli_env, *args, "-o", tmp_path / "one.png")
    two = _torchrun(cli_env, 2, *args, "-o", tmp_path / "two.png")
    assert one.returncode == 0 and two.returncode == 0, two.stderr.decode()[-3000:]
    assert np.abs(_pixels(tmp_path / "one.png") - _pixels(tmp_path / "two.png")).max() <= 1


@pytest.mark.parametrize("hook", ["die", "hang"])
@pytest.mark.slow
def test_a_rank_that_dies_or_hangs_stops_the_other_with_one_line(cli_env, tmp_path, hook):
    """Rank 1 exits (3) or hangs after its first UNet forward: rank 0 stops with one line, exit 1,
    and no image. A hung peer is noticed after LINFUSION_GROUP_TIMEOUT seconds, which covers only
    the run's messages (model loads wait under LINFUSION_LOAD_TIMEOUT), so 10 s is ample for a
    64 px step; rank 1 is stopped once its hook's file says it holds and rank 0 has ended."""
    holding = tmp_path / "holding"
    spec = "1:1" if hook == "die" else f"1:1:hold:{holding}"
    procs = _by_hand(cli_env, 2, "generate", "a lighthouse", "--model", "demo", "--res", "64", "--steps", "3",
                     "--seed", "1", "-o", tmp_path / "out.png",
                     extra_env={**HOOKS, "LINFUSION_TEST_BAND_FORWARDS": spec, "LINFUSION_GROUP_TIMEOUT": "10"})
    code0 = procs[0].wait(timeout=300)
    err0 = procs[0].stderr.read().decode()
    if hook == "hang":
        assert holding.exists(), err0[-2000:]  # rank 0 stopped because rank 1 held, not before
        procs[1].send_signal(signal.SIGINT)
    code1 = procs[1].wait(timeout=300)
    assert code0 == 1, err0[-2000:]
    errors = [line for line in err0.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "band-parallel run stopped" in errors[0], err0[-2000:]
    assert "Traceback" not in err0
    assert code1 == (3 if hook == "die" else 130)
    assert not (tmp_path / "out.png").exists()
    assert procs[0].stdout.read() == b""


def test_dry_run_plans_per_rank(cli, tmp_path):
    """16K SD1.5 in 6 GiB per GPU: over 8 ranks each holds 1/8 of the UNet's rows, so the last
    stage needs fewer of the slow knobs than alone."""
    base = ("generate", "a lighthouse", "--model", "runwayml/stable-diffusion-v1-5", "--res", "16384",
            "--aspect", "2:1", "--dry-run", "--max-vram", "6", "--device", "cuda", "--json")
    one = cli(*base)
    eight = cli(*base, "--world-size", "8")
    assert one.code == 0 and eight.code == 0, eight.err
    a, b = json.loads(one.out), json.loads(eight.out)
    assert "parallel" not in a and b["parallel"]["mode"] == "bands" and b["parallel"]["world_size"] == 8
    assert b["parallel"]["group_timeout_s"] == 600
    on = lambda plan: {k for k, v in plan["stages"][-1]["memory"].items()
                       if v is True or (k == "offload" and v != "none")}
    assert on(b) < on(a), (on(a), on(b))
    text = cli(*base[:-1], "--world-size", "8")
    assert "parallel: bands, world_size 8" in text.out and "LINFUSION_GROUP_TIMEOUT" in text.out
    for bad, needle in ((("--world-size", "0"), "--world-size must be"),
                        (("--world-size", "64", "--res", "2048"), "at least 64 latent rows"),
                        (("--world-size", "2", "--no-linfusion"), "needs LinFusion")):
        r = cli(*base, *bad)
        assert r.code == 2 and r.out == "" and len(r.err.strip().splitlines()) == 1, (bad, r.err)
        assert needle in r.err
    run = cli("generate", "a lighthouse", "--model", "demo", "--res", "64", "--world-size", "2")
    assert run.code == 2 and "torchrun --nproc-per-node 2" in run.err
    (tmp_path / "p.txt").write_text("a\nb\n")
    batch = ("batch", str(tmp_path / "p.txt"), "--model", "demo", "--res", "1024", "--dry-run", "-o", str(tmp_path / "o/"))
    planned = cli(*batch, "--world-size", "4", "--parallel", "bands")
    assert planned.code == 0 and planned.out.count("parallel: bands, world_size 4") == 2, planned.err
    refused = cli(*batch, "--world-size", "4")
    assert refused.code == 2 and "pass --parallel bands" in refused.err


@pytest.mark.slow
def test_batch_parallel_bands_makes_each_image_over_both_ranks(cli_env, tmp_path):
    """--parallel bands: every entry over all ranks, rank 0 writes, records and prints; the images
    are the one-process batch's (the default still shares out whole images)."""
    from .test_world import manifest_rows

    (tmp_path / "p.txt").write_text("a red boat\na blue boat\n")
    args = ["batch", "p.txt", "--model", "demo", "--res", "64", "--steps", "2", "--seed", "9", "--json"]
    one = _single(cli_env, *args, "-o", tmp_path / "one/")
    two = _torchrun(cli_env, 2, *args, "--parallel", "bands", "-o", tmp_path / "two/")
    assert one.returncode == 0 and two.returncode == 0, two.stderr.decode()[-3000:]
    rows = [json.loads(line) for line in two.stdout.decode().splitlines()]
    assert sorted(r["index"] for r in rows) == [0, 1]
    assert sorted(r["index"] for r in manifest_rows(tmp_path / "two")) == [0, 1]
    for name in ("0000-a-red-boat.png", "0001-a-blue-boat.png"):
        assert np.abs(_pixels(tmp_path / "one" / name) - _pixels(tmp_path / "two" / name)).max() <= 1
        assert read_metadata(tmp_path / "two" / name)["record"]["parallel"]["world_size"] == 2
    bad = _single(cli_env, *args, "--parallel", "rows", "-o", tmp_path / "bad/")
    assert bad.returncode == 2 and bad.stderr.decode().strip() == "error: --parallel must be images or bands, got 'rows'"


@pytest.mark.slow
def test_under_torchrun_a_dead_rank_stops_the_run_with_no_file(cli_env, tmp_path):
    """torchrun's agent ends the group when rank 1 dies mid-image: rank 0 stops with one line
    (its peer gone, or torchrun's SIGTERM), nothing is written, stdout stays empty."""
    env = dict(cli_env, **HOOKS, LINFUSION_TEST_BAND_FORWARDS="1:2")
    proc = _torchrun(env, 2, "generate", "a lighthouse", "--model", "demo", "--res", "64", "--steps", "3",
                     "--seed", "1", "-o", tmp_path / "out.png")
    err = proc.stderr.decode()
    assert proc.returncode != 0 and proc.stdout == b""
    ours = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(ours) == 1, err[-3000:]
    assert "band-parallel run stopped" in ours[0] or ours[0] == "error: interrupted (SIGTERM)"
    assert not (tmp_path / "out.png").exists()


def test_host_memory_is_planned_per_rank_for_every_rank_on_the_machine(cli, monkeypatch):
    """A rank parks only its rows' skips; every process on the machine (LOCAL_WORLD_SIZE, else
    all N) needs its own share of RAM and of the VAE's parking budget."""
    from linfusion_cli import hostmem
    from linfusion_cli.parallel.launch import processes_here
    from linfusion_cli.errors import InputError

    assert processes_here(8, {}) == 8 and processes_here(8, {"LOCAL_WORLD_SIZE": "2"}) == 2
    launcher = {"WORLD_SIZE": "4", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert processes_here(1, {**launcher, "LOCAL_WORLD_SIZE": "4"}) == 4  # a batch sharing out images
    with pytest.raises(InputError):
        processes_here(2, {"LOCAL_WORLD_SIZE": "two"})
    gib = 2 ** 30
    monkeypatch.setattr(hostmem, "host_memory", lambda: hostmem.HostMemory(64 * gib, 48 * gib))
    base = ("generate", "a lighthouse", "--model", "runwayml/stable-diffusion-v1-5", "--res", "16384",
            "--dry-run", "--max-vram", "4", "--device", "cuda", "--json")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    alone = json.loads(cli(*base, "--max-vram", "12").out)["stages"][-1]["memory"]
    wide = json.loads(cli(*base, "--world-size", "8").out)["stages"][-1]["memory"]
    assert alone["skips_on_cpu"] and wide["skips_on_cpu"]
    assert wide["estimated_host_gib"] < alone["estimated_host_gib"] - 5  # 1/8 of the skips
    assert wide["vae_host_gib"] == alone["vae_host_gib"]  # one process on this machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    eight_here = json.loads(cli(*base, "--world-size", "8").out)["stages"][-1]["memory"]
    assert eight_here["vae_host_gib"] == pytest.approx(alone["vae_host_gib"] / 8, abs=0.01)
    # on the CPU the host check itself counts every rank here
    small = ("generate", "a lighthouse", "--model", "demo", "--res", "1024", "--device", "cpu",
             "--world-size", "2", "--max-vram", "8", "--dry-run", "--json")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    need = max(s["memory"]["estimated_host_gib"] + s["memory"]["estimated_peak_gib"]  # the device is RAM too
               for s in json.loads(cli(*small).out)["stages"])
    monkeypatch.setattr(hostmem, "host_memory", lambda: hostmem.HostMemory(64 * gib, int(1.5 * need * gib)))
    assert cli(*small).code == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    refused = cli(*small)
    assert refused.code == 2 and "(2 processes here)" in refused.err, refused.err
    assert len(refused.err.strip().splitlines()) == 1
