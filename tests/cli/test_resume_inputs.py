"""--resume knows its inputs: weights replaced in place between the interruption and the resume
are refused (one line naming them), for stage checkpoints and batch manifests; one run per output."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from linfusion_cli.io import weights_id
from linfusion_cli.io.locks import lock_path
from linfusion_cli.io.metadata import read_metadata

from ..cli_helpers import files_under, write_preset
from .test_resume import CHILD, interrupt_in_process

PROMPT = "a resumed lighthouse"


@pytest.fixture
def model(tiny_pipeline_dirs, tmp_path) -> Path:
    """A private copy of the tiny SD 1.5 folder (the tests replace its weights)."""
    return Path(shutil.copytree(tiny_pipeline_dirs["sd15"], tmp_path / "model"))


@pytest.fixture
def args(tmp_path, model) -> list[str]:
    preset = write_preset(tmp_path / "tiny.yaml")
    return ["generate", PROMPT, "--preset", str(preset), "--model", str(model), "--linfusion", "fresh",
            "--res", "256", "--seed", "3", "-q", "-o", "out/x.png"]


def touch(path: Path) -> None:
    """The file rewritten in place: same bytes, a later modification time."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))


def test_replaced_model_weights_refuse_the_resume(cli, tmp_path, model, args, monkeypatch):
    interrupt_in_process(monkeypatch, 1)
    assert cli(*args).code == 130
    dry = cli(*args, "--resume", "--dry-run")
    assert dry.code == 0 and dry.out_lines[-1].startswith("resume: starts at stage 2 of 3"), dry.err

    touch(model / "unet" / "diffusion_pytorch_model.safetensors")
    for extra in (["--dry-run"], []):
        r = cli(*args, "--resume", *extra)
        assert r.code == 2 and len(r.err_lines) == 1, r.err
        assert "the model weights" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "out" / "x.png").exists(), "never finished from other weights' stages"

    fresh = cli(*args, "--overwrite")
    assert fresh.code == 0, fresh.err
    assert [p.name for p in files_under(tmp_path / "out")] == ["x.png"]


def test_weights_identity_covers_files_folders_and_hub_commits(tmp_path, monkeypatch):
    folder = tmp_path / "linfusion"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(b"a" * 10)
    (folder / "notes.txt").write_text("not a weight file")
    before = weights_id.of_source(str(folder))
    assert weights_id.of_source(str(weights)).startswith("files:") and before.startswith("files:")
    (folder / "notes.txt").write_text("changed, but not weights")
    assert weights_id.of_source(str(folder)) == before
    weights.write_bytes(b"b" * 11)  # replaced in place
    assert weights_id.of_source(str(folder)) != before

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert weights_id.of_source("org/controlnet") == "hub:not cached"
    refs = tmp_path / "hub" / "models--org--controlnet" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("abc123\n")
    assert weights_id.of_source("org/controlnet") == "hub:abc123"
    assert weights_id.of_source("demo") is None
    assert weights_id.changed({"model": "files:1", "linfusion": "files:2"},
                              {"model": "files:1", "linfusion": "files:3"}) == [
        "the LinFusion weights (changed on disk since)"]


def test_batch_resume_does_not_skip_an_image_of_other_weights(cli, tmp_path, model):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red boat\n")
    preset = write_preset(tmp_path / "tiny.yaml")
    args = ["batch", str(prompts), "--preset", str(preset), "--model", str(model), "--linfusion", "fresh",
            "--res", "128", "--seed", "4", "-o", "out/"]
    assert cli(*args).code == 0
    again = cli(*args, "--resume")
    assert again.code == 0 and "already done" in again.err
    touch(model / "vae" / "diffusion_pytorch_model.safetensors")
    changed = cli(*args, "--resume")
    assert changed.code == 2 and len(changed.err_lines) == 1 and "already done" not in changed.err, changed.err
    assert "exists with other weights (the model weights (changed on disk since))" in changed.err


# ---------------------------------------------------------------- one run per output


def test_a_held_lock_refuses_at_once_and_a_stale_one_is_taken_over(cli, tmp_path, args):
    (tmp_path / "out").mkdir()
    lock = lock_path(tmp_path / "out" / "x.png")
    lock.write_text(f"{os.getpid()} {socket.gethostname()}\n")  # a live process here
    held = cli(*args)
    assert held.code == 2 and len(held.err_lines) == 1, held.err
    assert f"process {os.getpid()}" in held.err and str(lock.relative_to(tmp_path)) in held.err
    dead = 2 ** 22 + 1  # above any pid_max: no such process on this host
    lock.write_text(f"{dead} {socket.gethostname()}\n")  # its run died without cleaning up
    taken = cli(*args)
    assert taken.code == 0, taken.err
    assert not lock.exists(), "the lock goes with the run"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    lock.symlink_to(victim)  # never followed, read or removed
    linked = cli(*args, "--overwrite")
    assert linked.code == 2 and "is a symbolic link, not a lock" in linked.err, linked.err
    assert victim.read_text() == "precious" and lock.is_symlink()


@pytest.mark.slow  # starts the first run as a subprocess
def test_two_resumes_of_one_output_the_second_fails_before_loading(cli, cli_env, tmp_path, args):
    """A run stopped after its stage 1 checkpoint (waiting on the test) holds the output: a second
    --resume fails at once with one line; once the first ends (SIGTERM), --resume goes on."""
    read_end, write_end = os.pipe()
    first = subprocess.Popen([sys.executable, "-c", CHILD, str(write_end), "1", *args], env=cli_env,
                             pass_fds=(write_end,), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            assert pipe.readline().strip(), first.communicate()[1].decode()
        second = cli(*args, "--resume")
        assert second.code == 2 and len(second.err_lines) == 1, second.err
        assert "is being made by process" in second.err and "loading" not in second.err
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    resumed = cli(*args, "--resume")
    assert resumed.code == 0, resumed.err
    assert read_metadata(tmp_path / "out" / "x.png")["record"]["resumed"] == {"after_stage": 1}


def test_resume_of_a_finished_output_says_already_done(cli, tmp_path):
    """As batch --resume does: stderr says so, stdout has the path (or JSON), exit 0; a drawn seed
    is the one the image recorded; other settings are still refused."""
    preset = str(write_preset(tmp_path / "tiny.yaml"))
    args = ["generate", PROMPT, "--preset", preset, "--res", "128", "-o", "out/y.png"]
    assert cli(*args).code == 0  # a drawn seed
    before = (tmp_path / "out" / "y.png").stat().st_mtime_ns
    done = cli(*args, "--resume")
    assert done.code == 0 and done.out_lines == ["out/y.png"] and "out/y.png already done" in done.err, done.err
    as_json = cli(*args, "--resume", "--json")
    assert json.loads(as_json.out) == {"path": "out/y.png", "skipped": True}
    assert (tmp_path / "out" / "y.png").stat().st_mtime_ns == before, "nothing was made again"
    other = cli(*args, "--resume", "--steps", "3")
    assert other.code == 2 and "already done" not in other.err and "exists" in other.err, other.err


def test_checkpoints_from_before_weights_were_recorded_still_resume(cli, tmp_path, args, monkeypatch):
    from linfusion_cli.io import images

    interrupt_in_process(monkeypatch, 1)
    assert cli(*args).code == 130
    ckpt = tmp_path / "out" / ".x.png.stage1-64x64.png"
    record = read_metadata(ckpt)["record"]
    del record["checkpoint"]["settings"]["weights"]  # as an earlier version wrote it
    images.save_image(np.asarray(Image.open(ckpt).convert("RGB")), ckpt, record=record, fmt="png", overwrite=True)
    resumed = cli(*args, "--resume")
    assert resumed.code == 0, resumed.err
    assert read_metadata(tmp_path / "out" / "x.png")["record"]["resumed"] == {"after_stage": 1}


def test_a_replaced_controlnet_refuses_the_resume(cli, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    from linfusion_cli.models.tiny import DEMO_UNET_CONFIGS

    from ..adapter_helpers import save_tiny_controlnet

    cn = save_tiny_controlnet(tmp_path / "canny", UNet2DConditionModel(**DEMO_UNET_CONFIGS["sd15"]))
    control = tmp_path / "edges.png"
    Image.new("RGB", (40, 40), (255, 255, 255)).save(control)
    preset = str(write_preset(tmp_path / "tiny.yaml"))
    args = ["generate", PROMPT, "--preset", preset, "--res", "256", "--seed", "2", "--controlnet", str(cn),
            "--control-image", str(control), "-o", "out/c.png"]
    interrupt_in_process(monkeypatch, 1)
    assert cli(*args).code == 130
    weights = next(p for p in Path(cn).rglob("*.safetensors"))
    touch(weights)
    r = cli(*args, "--resume")
    assert r.code == 2 and len(r.err_lines) == 1, r.err
    assert "the ControlNet weights" in r.err and "the model weights" not in r.err
