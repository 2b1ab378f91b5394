"""Out of memory as a user meets it (LINFUSION_TEST_OOM through the real stages): a run that
recovers says so in its record; one that cannot ends with exit 1 and one line, the finished
stage kept; a batch entry after a recovered one runs with every patch of the retry removed."""

from __future__ import annotations

import json

import numpy as np

from linfusion_cli import testhooks
from linfusion_cli.io.metadata import read_metadata

from ..cli_helpers import files_under, pixels, write_preset

DEMO = ("--preset", "tiny.yaml", "--res", "128", "--seed", "5")  # 64 px, then 128 px img2img


def _tiny(folder) -> None:
    write_preset(folder / "tiny.yaml")  # the cli fixture runs in folder


def _hooks(monkeypatch, spec: str) -> None:
    monkeypatch.setenv(testhooks.ENABLE, "1")
    monkeypatch.setenv(testhooks.OOM, spec)


def test_out_of_memory_on_every_attempt_is_exit_1_one_line_and_keeps_the_finished_stage(cli, tmp_path,
                                                                                          monkeypatch):
    _tiny(tmp_path)
    _hooks(monkeypatch, "*:vae_encode:*")  # stage 2's encode, every time
    result = cli("generate", "a cat", *DEMO, "-q", "-o", tmp_path / "cat.png")
    assert result.code == 1
    assert len(result.err_lines) == 1 and "Traceback" not in result.err, result.err
    line = result.err_lines[0]
    assert line.startswith("error: stage 2 (128x128) ran out of device memory in the VAE encode"), line
    assert "smallest budget tried:" in line and "stage 1's image is kept as" in line
    kept = [p for p in files_under(tmp_path) if p.suffix == ".png"]
    assert [p.name for p in kept] == ["cat.png.stage1-64x64.png"] and str(kept[0]) in line
    assert not (tmp_path / "cat.png").exists() and result.out == ""


def test_a_recovered_run_records_its_attempts_and_the_next_batch_entry_has_no_patch_left(cli, tmp_path,
                                                                                            monkeypatch):
    _tiny(tmp_path)
    reference = cli("batch", "-", *DEMO, "--json", "-q", "-o", tmp_path / "ref", stdin="a cat\na dog\n")
    assert reference.code == 0, reference.err
    _hooks(monkeypatch, "0:unet:1")  # the first UNet forward of the first entry
    result = cli("batch", "-", *DEMO, "--json", "-q", "-o", tmp_path / "out", stdin="a cat\na dog\n")
    assert result.code == 0, result.err
    made = {json.loads(line)["index"]: json.loads(line)["path"] for line in result.out_lines}
    ref = {json.loads(line)["index"]: json.loads(line)["path"] for line in reference.out_lines}
    first, second = (read_metadata(made[i])["record"]["stages"] for i in sorted(made))
    assert [a["phase"] for a in first[0]["attempts"]] == ["unet"]
    assert first[0]["memory"] == first[0]["attempts"][0]["retry"]["memory"]
    assert first[0]["memory_in_effect"]["ff_chunk"] == first[0]["memory"]["ff_chunk"] != 0
    assert first[0]["device_memory"] is None  # CPU: no device figures to report
    for stage in second:  # the knobs read off the modules are the plan's: nothing stayed on
        assert stage["attempts"] == []
        assert {k: stage["memory_in_effect"][k] for k in ("ff_chunk", "cfg_split", "inplace")} == \
            {k: stage["memory"][k] for k in ("ff_chunk", "cfg_split", "inplace")}
    for i in sorted(made):
        assert np.abs(pixels(made[i]).astype(int) - pixels(ref[i]).astype(int)).max() <= 1
