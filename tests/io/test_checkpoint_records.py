"""Checkpoints are checked when read: a damaged record, an image of another size or changed pixels
are passed over with a line saying so, the run starts where it says, and a foreign file at a
checkpoint's name is refused with what it is and what to do."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from PIL import Image

from linfusion_cli.io import checkpoint_records, images
from linfusion_cli.io.metadata import read_metadata

from ..cli.test_resume import interrupt_in_process
from ..cli_helpers import write_preset

PROMPT = "a checked lighthouse"


@pytest.fixture
def args(tmp_path) -> list[str]:
    preset = write_preset(tmp_path / "tiny.yaml")
    return ["generate", PROMPT, "--preset", str(preset), "--res", "256", "--seed", "6", "-o", "out/x.png"]


@pytest.fixture
def interrupted(cli, tmp_path, args, monkeypatch):
    """The run stopped after stage 2: (stage 1 checkpoint, stage 2 checkpoint)."""
    interrupt_in_process(monkeypatch, 2)
    assert cli(*args).code == 130
    out = tmp_path / "out"
    return out / ".x.png.stage1-64x64.png", out / ".x.png.stage2-128x128.png"


def rewrite(path, *, record=None, image=None) -> None:
    """The checkpoint rewritten with another record or image (the other kept as it is)."""
    old = read_metadata(path)["record"]
    pixels = image if image is not None else np.asarray(Image.open(path).convert("RGB"))
    images.save_image(pixels, path, record=record if record is not None else old, fmt="png", overwrite=True)


def damaged_record(path):
    record = copy.deepcopy(read_metadata(path)["record"])
    record["stages"][1]["seconds"] = "soon"
    return record


def test_damaged_record_is_passed_over_and_the_run_says_where_it_starts(cli, tmp_path, args, interrupted):
    stage1, stage2 = interrupted
    rewrite(stage2, record=damaged_record(stage2))
    dry = cli(*args, "--resume", "--dry-run")
    assert dry.code == 0, dry.err
    assert dry.out_lines[-2:] == [
        f"resume: out/{stage2.name}: its checkpoint record is damaged (stages[2].seconds is not a "
        "number); not used",
        f"resume: starts at stage 2 of 3 from out/{stage1.name}"]

    good = read_metadata(stage1)["record"]
    rewrite(stage1, record=good | {"stages": []})
    plain = cli(*args)  # without --resume, a damaged stage 1: the choice, in one line
    assert plain.code == 2 and len(plain.err_lines) == 1, plain.err
    assert "--resume to go on from the last valid stage" in plain.err and "--overwrite" in plain.err
    rewrite(stage1, record=good)

    resumed = cli(*args, "--resume")
    assert resumed.code == 0, resumed.err
    assert f"starts at stage 2 of 3 from out/{stage1.name}" in resumed.err
    record = read_metadata(tmp_path / "out" / "x.png")["record"]
    assert record["resumed"] == {"after_stage": 1}, "the run started where it said"
    assert [s["width"] for s in record["stages"]] == [64, 128, 256]


def test_checkpoint_image_of_another_size_is_not_resumed(cli, tmp_path, args, interrupted):
    stage1, stage2 = interrupted
    small = np.asarray(Image.open(stage1).convert("RGB"))  # 64x64 under the 128x128 name
    rewrite(stage2, image=small)
    resumed = cli(*args, "--resume")
    assert resumed.code == 0, resumed.err
    assert f"{stage2.name}: its image is 64x64, not the 128x128 of stage 2; not used" in resumed.err
    assert read_metadata(tmp_path / "out" / "x.png")["record"]["resumed"] == {"after_stage": 1}


def test_changed_pixels_are_announced_not_silently_skipped(cli, tmp_path, args, interrupted):
    _, stage2 = interrupted
    image = np.asarray(Image.open(stage2).convert("RGB")).copy()
    image[0, 0] ^= 1
    rewrite(stage2, image=image)
    dry = cli(*args, "--resume", "--dry-run", "--json")
    assert dry.code == 0, dry.err
    resume = json.loads(dry.out)["resume"]
    assert resume["start_stage"] == 2 and "not the ones it recorded" in resume["notes"][0]


@pytest.mark.parametrize("content, what", [
    (None, "an image without a checkpoint record"),
    (b"hello", "not an image this program wrote"),
])
def test_a_foreign_file_at_a_checkpoint_name_is_named(cli, tmp_path, args, content, what):
    spot = tmp_path / "out" / ".x.png.stage1-64x64.png"
    spot.parent.mkdir()
    if content is None:
        Image.new("RGB", (64, 64)).save(spot)
    else:
        spot.write_bytes(content)
    for extra in ([], ["--resume"]):
        r = cli(*args, *extra)
        assert r.code == 2 and len(r.err_lines) == 1, r.err
        assert f"is where stage 1 of x.png is kept, and it is {what}" in r.err
        assert "move it away, or pass --overwrite" in r.err
    assert spot.exists(), "a foreign file is never replaced without --overwrite"


GOOD_STAGE = {"width": 64, "height": 64, "denoise_steps": 2, "seconds": 0.5, "strength": None, "peak_gib": None}


@pytest.mark.parametrize("change, why", [
    (lambda r: r["checkpoint"].update(stage="1"), "checkpoint.stage"),
    (lambda r: r["checkpoint"].pop("settings"), "checkpoint.settings"),
    (lambda r: r["checkpoint"].update(pixels_sha256=7), "checkpoint.pixels_sha256"),
    (lambda r: r["checkpoint"].update(float32=[1]), "checkpoint.float32"),
    (lambda r: r["checkpoint"].update(float32=["text"]), "checkpoint.float32"),
    (lambda r: r.update(stages=[]), "does not hold 1 stage"),
    (lambda r: r["stages"][0].pop("peak_gib"), "stages[1].peak_gib"),
    (lambda r: r["stages"][0].update(width=True), "stages[1].width"),
])
def test_record_check_names_the_first_bad_field(change, why):
    record = {"checkpoint": {"stage": 1, "of": 3, "settings": {}, "pixels_sha256": "0" * 64, "float32": []},
              "stages": [dict(GOOD_STAGE)]}
    assert checkpoint_records.check(copy.deepcopy(record)) is None
    change(record)
    assert why in checkpoint_records.check(record)


def test_batch_resume_says_which_checkpoint_it_passes_over(cli, tmp_path, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red boat\n")
    args = ["batch", str(prompts), "--preset", str(write_preset(tmp_path / "tiny.yaml")), "--res", "256",
            "--seed", "8", "-o", "out/"]
    interrupt_in_process(monkeypatch, 2)
    assert cli(*args).code == 130
    stage2 = next((tmp_path / "out").glob(".*.stage2-128x128.png"))
    rewrite(stage2, record=damaged_record(stage2))
    resumed = cli(*args, "--resume")
    assert resumed.code == 0, resumed.err
    assert f"resume: out/{stage2.name}: its checkpoint record is damaged" in resumed.err
    final = next(p for p in (tmp_path / "out").glob("*.png") if ".stage" not in p.name)
    assert read_metadata(final)["record"]["resumed"] == {"after_stage": 1}
