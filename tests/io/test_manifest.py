"""The batch run manifest: --resume skips exactly what is finished, reuses drawn seeds, remakes damage."""

from __future__ import annotations

import json

import numpy as np

from linfusion_cli.io.manifest import MANIFEST_NAME, Manifest

from ..cli_helpers import pixels


ARGS = ("batch", "-", "--model", "demo", "--steps", "2", "--res", "64", "--json", "-o", "out/", "-q")
PROMPTS = "one\ntwo\nthree\n"


def rows(result) -> list[dict]:
    assert result.code == 0, result.err
    return [json.loads(line) for line in result.out_lines]


def test_resume_without_seed_reuses_recorded_seeds_and_remakes_damaged_files(cli, tmp_path):
    first = rows(cli(*ARGS, stdin=PROMPTS))  # no --seed: a random batch seed
    seeds = [row["seed"] for row in first]
    paths = [tmp_path / row["path"] for row in first]
    before = [pixels(p) for p in paths]
    paths[1].unlink()  # gone
    paths[2].write_bytes(paths[2].read_bytes()[:-100])  # truncated: its metadata still reads
    kept = paths[0].stat().st_mtime_ns

    again = rows(cli(*ARGS, "--resume", stdin=PROMPTS))
    assert [row.get("skipped", False) for row in again] == [True, False, False]
    assert [row["seed"] for row in again[1:]] == seeds[1:], "the seeds the first run drew"
    assert paths[0].stat().st_mtime_ns == kept
    for path, want in zip(paths, before):
        assert np.array_equal(pixels(path), want), path.name
    records = Manifest(tmp_path / "out").load().records
    assert sorted(records) == [0, 1, 2] and [records[i].seed for i in range(3)] == seeds


def test_resume_does_not_skip_other_settings(cli, tmp_path):
    first = rows(cli(*ARGS, "--seed", "4", stdin=PROMPTS))
    (tmp_path / first[0]["path"]).unlink()
    # the scheduler is not part of the file name: the existing images are refused, not skipped
    changed = cli(*ARGS, "--seed", "4", "--scheduler", "euler", "--resume", stdin=PROMPTS)
    assert changed.code == 2 and len(changed.err_lines) == 1 and "other parameters" in changed.err
    redone = rows(cli(*ARGS, "--seed", "4", "--scheduler", "euler", "--resume", "--overwrite", stdin=PROMPTS))
    assert not any(row.get("skipped") for row in redone)
    records = Manifest(tmp_path / "out").load().records
    assert {records[i].params["stages"][0][5] for i in range(3)} == {"euler"}


def test_manifest_ignores_a_torn_line_and_appends_after_it(cli, tmp_path):
    rows(cli(*ARGS, "--seed", "1", stdin="one\n"))
    path = tmp_path / "out" / MANIFEST_NAME
    path.write_text(path.read_text() + '{"index": 1, "path": "0001-tw')  # a crash mid-line
    assert sorted(Manifest(tmp_path / "out").load().records) == [0]
    again = rows(cli(*ARGS, "--seed", "1", "--resume", stdin="one\ntwo\n"))
    assert [row.get("skipped", False) for row in again] == [True, False]
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["index"] == 1
    assert sorted(Manifest(tmp_path / "out").load().records) == [0, 1]


def test_resume_does_not_skip_another_upscale_method(cli, tmp_path):
    from ..cli_helpers import write_preset

    preset = write_preset(tmp_path / "ladder.yaml")  # 64 px base, then a x2 img2img stage
    args = ("batch", "-", "--preset", str(preset), "--res", "128", "--seed", "3", "--json", "-o", "out/", "-q")
    rows(cli(*args, "--method", "sdedit", stdin="one\n"))
    assert rows(cli(*args, "--method", "sdedit", "--resume", stdin="one\n"))[0]["skipped"]
    other = cli(*args, "--method", "demofusion", "--resume", stdin="one\n")
    assert other.code == 2 and "other parameters" in other.err and len(other.err_lines) == 1
