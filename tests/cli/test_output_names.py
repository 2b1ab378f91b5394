"""Output names never collide with checkpoints: x.png and x.jpg keep their own, a batch entry named
like another's checkpoint is refused at plan time, --resume --save-stages never keeps another
run's stage file, earlier versions' names are still resumed, and {ext} agrees with the suffix."""

from __future__ import annotations

import json

import pytest

from linfusion_cli.io.metadata import read_metadata

from ..cli_helpers import files_under, write_preset
from .test_resume import interrupt_in_process

PROMPT = "a named lighthouse"


@pytest.fixture
def preset(tmp_path) -> str:
    return str(write_preset(tmp_path / "tiny.yaml"))


def gen(preset, *extra) -> list[str]:
    return ["generate", PROMPT, "--preset", preset, "--res", "256", *extra]


def test_same_stem_other_suffix_keeps_its_own_checkpoints(cli, tmp_path, preset, monkeypatch):
    interrupt_in_process(monkeypatch, 1)
    assert cli(*gen(preset, "--seed", "1", "-o", "out/x.png")).code == 130
    other = cli(*gen(preset, "--seed", "2", "-o", "out/x.jpg"))
    assert other.code == 0, other.err  # x.png's unfinished run is none of x.jpg's business
    assert (tmp_path / "out" / ".x.png.stage1-64x64.png").exists()
    resumed = cli(*gen(preset, "--seed", "1", "--resume", "-o", "out/x.png"))
    assert resumed.code == 0, resumed.err
    assert "starts at stage 2 of 3 from out/.x.png.stage1-64x64.png" in resumed.err
    assert sorted(p.name for p in files_under(tmp_path / "out")) == ["x.jpg", "x.png"]


@pytest.mark.parametrize("order", [0, 1])
def test_batch_entry_named_like_a_checkpoint_is_refused_at_plan_time(cli, tmp_path, preset, order):
    lines = ['{"prompt": "a", "output": "a.png"}', '{"prompt": "b", "output": ".a.png.stage1-64x64.png"}']
    lines = lines if order == 0 else lines[::-1]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    r = cli("batch", str(prompts), "--preset", preset, "--res", "256", "-o", "out/")
    assert r.code == 2 and len(r.err_lines) == 1, r.err
    assert "stage checkpoint" in r.err and ".a.png.stage1-64x64.png" in r.err and f"{prompts}:2" in r.err
    assert files_under(tmp_path / "out") == [], "refused before anything ran"


def test_earlier_versions_checkpoint_names_are_resumed_and_cleared(cli, tmp_path, preset, monkeypatch):
    interrupt_in_process(monkeypatch, 1)
    args = gen(preset, "--seed", "3", "-o", "out/x.png")
    assert cli(*args).code == 130
    out = tmp_path / "out"
    (out / ".x.png.stage1-64x64.png").rename(out / ".x.stage1-64x64.png")  # the old name
    resumed = cli(*args, "--resume")
    assert resumed.code == 0, resumed.err
    assert "starts at stage 2 of 3 from out/.x.stage1-64x64.png" in resumed.err
    assert [p.name for p in files_under(out)] == ["x.png"], "the old checkpoint goes once used"


def test_resume_save_stages_never_keeps_another_runs_stage_file(cli, tmp_path, preset, monkeypatch):
    out = tmp_path / "out"
    interrupt_in_process(monkeypatch, 1)
    assert cli(*gen(preset, "--seed", "4", "--save-stages", "-o", "out/x.png")).code == 130
    (out / "x.png.stage1-64x64.png").rename(tmp_path / "seed4.png")  # another run's stage file
    interrupt_in_process(monkeypatch, 1)
    args = gen(preset, "--seed", "5", "-o", "out/x.png")
    assert cli(*args).code == 130  # this run's hidden checkpoint
    (tmp_path / "seed4.png").rename(out / "x.png.stage1-64x64.png")
    refused = cli(*args, "--resume", "--save-stages")
    assert refused.code == 2 and len(refused.err_lines) == 1, refused.err
    assert "x.png.stage1-64x64.png is where stage 1 of x.png is kept" in refused.err
    assert "other settings" in refused.err and "--overwrite" in refused.err
    (out / "x.png.stage1-64x64.png").unlink()
    resumed = cli(*args, "--resume", "--save-stages")
    assert resumed.code == 0, resumed.err
    kept = read_metadata(out / "x.png.stage1-64x64.png")["record"]
    assert kept["seed"] == 5, "the stage file is this run's"
    assert not (out / ".x.png.stage1-64x64.png").exists()


@pytest.mark.parametrize("name, extra, ok", [
    ("{slug}.{ext}.jpg", [], False),  # {ext} png, the suffix says jpg
    ("{slug}.jpg", ["--format", "png"], False),  # a PNG in a .jpg name
    ("{slug}.{ext}", ["--format", "jpg"], True),
    ("{slug}.tif", [], True),  # the suffix decides: TIFF
])
def test_ext_agrees_with_the_suffix_that_decides_the_format(cli, tmp_path, preset, name, extra, ok):
    (tmp_path / "p.txt").write_text("a boat\n")
    r = cli("batch", "p.txt", "--preset", preset, "--res", "256", "--seed", "1", "--dry-run", "--json",
            "--name", name, *extra, "-o", "out/")
    if ok:
        assert r.code == 0, r.err
        assert json.loads(r.out)["path"].endswith((".jpg", ".tif"))
    else:
        assert r.code == 2 and len(r.err_lines) == 1, r.err
        assert "decides the format" in r.err or "is not the format" in r.err
