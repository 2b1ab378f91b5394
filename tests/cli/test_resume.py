"""--resume: a run killed after any stage goes on from that stage's checkpoint, bit-identical.

The matrix interrupts a real subprocess after stage 1 or 2 of three with SIGINT, SIGTERM and
SIGKILL (each signal and each stage at least once; file and folder outputs, --seed and a drawn
seed, generate and upscale, hidden checkpoints and --save-stages). The child blocks right after
the checkpoint is written and says so on a pipe: the test signals on that event, never on a delay.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from linfusion_cli.io import checkpoints
from linfusion_cli.io.metadata import read_metadata

from ..cli_helpers import files_under, pixels, write_preset

# three stages: 64 px text-to-image, then 128 and 256 px img2img
ARGS = ("--res", "256", "-q")
PROMPT = "a resumed lighthouse"

# Runs the CLI; after stage K's checkpoint is published, writes its path to the pipe FD and
# waits for the test's signal (SIGINT/SIGTERM end the run as usual; SIGKILL ends it outright).
CHILD = r"""
import os, signal, sys
from pathlib import Path
fd, stage, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
from linfusion_cli.io import images
real = images.save_image
def save_image(image, path, **kwargs):
    written = real(image, path, **kwargs)
    if path is not None and f".stage{stage}-" in Path(path).name:
        os.write(fd, (str(written) + "\n").encode())
        while True:
            signal.pause()
    return written
images.save_image = save_image
from linfusion_cli.cli.app import main
sys.argv = ["linfusion", *argv]
main()
"""


def interrupted(env, stage: int, signum: int, args: list[str]) -> tuple[int, str, str]:
    """Run CHILD until stage `stage` is checkpointed, send `signum`; (exit code, checkpoint, stderr)."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(write_end), str(stage), *args], env=env,
                            pass_fds=(write_end,), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            ready, _, _ = select.select([pipe], [], [], 600)  # the event; 600 s only against a hang
            line = pipe.readline().decode().strip() if ready else ""
        assert line, f"the child ended before stage {stage}: {proc.communicate()[1].decode()}"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, line, err.decode()


def hidden_files(folder: Path) -> list[Path]:
    return [p for p in files_under(folder) if p.name.startswith(".")]


def interrupt_in_process(monkeypatch, stage: int):
    """save_image that raises Ctrl-C right after stage `stage`'s checkpoint is written."""
    from linfusion_cli.io import images

    real = images.save_image

    def save_image(image, path, **kwargs):
        written = real(image, path, **kwargs)
        if path is not None and f".stage{stage}-" in Path(path).name:
            monkeypatch.setattr(images, "save_image", real)
            raise KeyboardInterrupt
        return written

    monkeypatch.setattr(images, "save_image", save_image)


@pytest.fixture
def preset(tmp_path) -> str:
    return str(write_preset(tmp_path / "tiny.yaml"))


@pytest.fixture
def source(tmp_path) -> Path:
    """A 32 px input image: upscale makes the same three stages (64, 128, 256 px)."""
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


CASES = {  # id: (stage interrupted after, signal, command, output, extra flags)
    "file-seed-SIGINT-after-1": (1, signal.SIGINT, "generate", "out/final.png", ["--seed", "11"]),
    "folder-drawn-seed-SIGTERM-after-2": (2, signal.SIGTERM, "generate", "out/", []),
    "upscale-drawn-seed-SIGKILL-after-1": (1, signal.SIGKILL, "upscale", "out/up.png", []),
    "save-stages-SIGKILL-after-2": (2, signal.SIGKILL, "generate", "out/final.png",
                                    ["--seed", "12", "--save-stages"]),
}


@pytest.mark.slow  # a child process is interrupted
@pytest.mark.parametrize("case", CASES)
def test_resume_after_a_signal_is_bit_identical(cli, cli_env, tmp_path, preset, source, case):
    stage, signum, command, output, extra = CASES[case]
    head = [command, str(source), PROMPT] if command == "upscale" else [command, PROMPT]
    args = [*head, "--preset", preset, *ARGS, *extra]
    code, written, err = interrupted(cli_env, stage, signum, [*args, "-o", output])
    assert code == (-signal.SIGKILL if signum == signal.SIGKILL else 128 + signum), err
    out = tmp_path / "out"
    kept = files_under(out)
    assert [p.name for p in kept if ".stage" not in p.name and not p.name.endswith(".lock")] == [], \
        "no final image, no .part file (a SIGKILL leaves its lock: stale, taken over by --resume)"
    kept = [p for p in kept if not p.name.endswith(".lock")]
    assert sorted(int(p.name.split(".stage")[1].split("-")[0]) for p in kept) == list(range(1, stage + 1))
    assert tmp_path / written in kept

    dry = cli(*args, "--resume", "--dry-run", "-o", output)
    assert dry.code == 0, dry.err
    assert dry.out_lines[-1] == f"resume: starts at stage {stage + 1} of 3 from {written}"

    resumed = cli(*args, "--resume", "--json", "-o", output)
    assert resumed.code == 0, resumed.err
    result = json.loads(resumed.out)
    final = Path(result["path"])
    record = read_metadata(final)["record"]
    assert record["resumed"] == {"after_stage": stage}
    assert [s["width"] for s in record["stages"]] == [64, 128, 256]
    if output.endswith("/"):  # the drawn seed came back from the checkpoint, and with it the name
        assert final.name.startswith(f"0000-{record['seed']}-")
    assert hidden_files(out) == [], "hidden checkpoints removed on success"
    stage_files = sorted(p.name for p in files_under(out) if ".stage" in p.name)
    assert stage_files == (["final.png.stage1-64x64.png", "final.png.stage2-128x128.png"]
                           if "--save-stages" in extra else [])

    ref = tmp_path / "ref"
    seed = [] if "--seed" in extra else ["--seed", str(record["seed"])]
    reference = cli(*args, *seed, "--json", "-o", str(ref) + "/")
    assert reference.code == 0, reference.err
    assert np.array_equal(pixels(final), pixels(Path(json.loads(reference.out)["path"]))), \
        "the resumed image is the uninterrupted one, bit for bit"
    for name in stage_files:
        kept_stage = next(ref.glob("*" + name.split("final")[1]))
        assert np.array_equal(pixels(out / name), pixels(kept_stage))


def test_mismatch_dry_run_and_start_over(cli, tmp_path, preset, monkeypatch):
    """Other settings: one line naming them, exit 2; no --resume: refused with advice; the dry run
    names the start; --overwrite starts over and clears the checkpoints."""
    args = ["generate", PROMPT, "--preset", preset, *ARGS, "--seed", "5", "-o", "out/x.png"]
    interrupt_in_process(monkeypatch, 2)
    assert cli(*args).code == 130
    ckpt = tmp_path / "out" / ".x.png.stage2-128x128.png"
    assert hidden_files(tmp_path / "out") == [tmp_path / "out" / ".x.png.stage1-64x64.png", ckpt]
    mark = read_metadata(ckpt)["record"]["checkpoint"]
    assert mark["stage"] == 2 and mark["settings"]["seed"] == 5

    bad = cli(*args[:-2], "--strengths", "0.75,0.5", "--guidance", "3", "--resume", "-o", "out/x.png")
    assert bad.code == 2 and len(bad.err_lines) == 1, bad.err
    assert "other settings" in bad.err and "guidance" in bad.err and "unexpected" not in bad.err
    # only stage 2 differs: stage 1's checkpoint still matches, so the run starts at stage 2
    dry = cli(*args[:-2], "--strengths", "0.75,0.5", "--resume", "--dry-run", "--json", "-o", "out/x.png")
    assert json.loads(dry.out)["resume"]["start_stage"] == 2

    again = cli(*args)
    assert again.code == 2 and len(again.err_lines) == 1 and "--resume" in again.err
    dry = cli(*args, "--resume", "--dry-run", "--json")
    assert json.loads(dry.out)["resume"] == {"start_stage": 3, "stages": 3, "checkpoint": str(ckpt.relative_to(tmp_path))}
    fresh = cli(*args, "--overwrite")
    assert fresh.code == 0, fresh.err
    assert files_under(tmp_path / "out") == [tmp_path / "out" / "x.png"]
    assert "resumed" not in read_metadata(tmp_path / "out" / "x.png")["record"]


def test_checkpoint_paths_follow_the_output_rules(cli, tmp_path, preset):
    """A link where a checkpoint goes is refused before anything runs, with or without --resume."""
    (tmp_path / "out").mkdir()
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    (tmp_path / "out" / ".x.png.stage1-64x64.png").symlink_to(victim)
    for extra in ([], ["--resume"], ["--overwrite"]):
        r = cli("generate", PROMPT, "--preset", preset, *ARGS, "--seed", "1", "-o", "out/x.png", *extra)
        assert r.code == 2 and len(r.err_lines) == 1 and "symbolic link" in r.err, r.err
    assert victim.read_bytes() == b"precious"


def test_batch_resume_goes_on_inside_a_half_finished_entry(cli, tmp_path, preset, monkeypatch):
    """Killed inside the first entry (no manifest line yet, no --seed): --resume takes the batch
    seed from the checkpoint, resumes that entry after stage 1 and makes the rest."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red boat\na blue boat\n")
    args = ["batch", str(prompts), "--preset", preset, *ARGS]
    interrupt_in_process(monkeypatch, 1)
    assert cli(*args, "-o", "out/").code == 130
    assert [p.name for p in files_under(tmp_path / "out")] == [".0000-a-red-boat.png.stage1-64x64.png"]
    dry = cli(*args, "--resume", "--dry-run", "-o", "out/")
    assert [line for line in dry.out_lines if line.startswith("resume:")] == [
        "resume: starts at stage 2 of 3 from out/.0000-a-red-boat.png.stage1-64x64.png",
        "resume: no checkpoint; starts at stage 1 of 3"]

    resumed = cli(*args, "--resume", "--json", "-o", "out/")
    assert resumed.code == 0, resumed.err
    made = [json.loads(line) for line in resumed.out_lines]
    assert hidden_files(tmp_path / "out") == []
    first = read_metadata(tmp_path / made[0]["path"])["record"]
    assert first["resumed"] == {"after_stage": 1}
    base = first["seed"]  # entry 0: the batch seed itself
    assert made[1]["seed"] == base + 1
    reference = cli(*args, "--seed", str(base), "--json", "-o", "ref/")
    assert reference.code == 0, reference.err
    for mine, theirs in zip(made, [json.loads(line) for line in reference.out_lines]):
        assert np.array_equal(pixels(tmp_path / mine["path"]), pixels(tmp_path / theirs["path"]))


def test_settings_leave_out_memory_knobs_and_name_what_differs(cli_env, preset):
    from dataclasses import replace

    from linfusion_cli import api
    from linfusion_cli.io.targets import image_bound, run_bound

    plan = api.plan("x", res=256, seed=1, preset=preset)
    assert len(plan.stages) == 3
    tighter = plan.with_memory([replace(s.memory, cfg_split=True, ff_chunk=64) for s in plan.stages])
    assert checkpoints.settings(tighter, 1) == checkpoints.settings(plan, 1)
    other = replace(plan, stages=tuple(replace(s, guidance=3.0) for s in plan.stages))
    assert checkpoints.differences(checkpoints.settings(other, 1), checkpoints.settings(plan.with_seed(9), 1)) \
        == ["seed", "stage 1 guidance", "stage 2 guidance"]
    # free space: the final image and every earlier stage's checkpoint
    assert run_bound(plan, "png") == sum(image_bound(s.width, s.height, "png") for s in plan.stages)
