"""api.plan_batch checks a whole batch file for a Python caller before anything runs: Jobs with
named fields, two entries writing one file refused by line, an output in the way refused."""

from __future__ import annotations

import json

import pytest

from linfusion_cli import api
from linfusion_cli.errors import InputError, OutputError
from linfusion_cli.io.prompts import read_prompt_file

from ..cli_helpers import write_preset


@pytest.fixture
def base(cli_env, tmp_path):
    preset = str(write_preset(tmp_path / "tiny.yaml"))
    return api.Request(prompt="", model="demo", res=64, steps=2, preset=preset)


def _entries(tmp_path, *rows: dict):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return read_prompt_file(str(path))


def test_jobs_carry_their_plan_path_line_and_seed(base, tmp_path):
    entries = _entries(tmp_path, {"prompt": "one"}, {"prompt": "two", "seed": 9})
    jobs, manifest = api.plan_batch(entries, base, "out")
    assert [job.index for job in jobs] == [0, 1] and all(isinstance(job, api.Job) for job in jobs)
    assert [job.plan.prompt for job in jobs] == ["one", "two"]
    assert [job.path.name for job in jobs] == ["0000-one.png", "0001-two.png"] and jobs[0].fmt == "png"
    assert jobs[0].base_seed is not None and jobs[1].base_seed is None  # drawn, then the line's own
    assert jobs[1].plan.seed == 9 and jobs[1].where.endswith("p.jsonl:2")
    assert manifest.path.parent.name == "out" and not (tmp_path / "out").exists()  # nothing created


def test_two_entries_writing_one_file_are_refused_by_line(base, tmp_path):
    entries = _entries(tmp_path, {"prompt": "a", "output": "x.png"}, {"prompt": "b", "output": "x.png"})
    with pytest.raises(OutputError, match=r"p.jsonl:2: output .*x.png is also line 1's output"):
        api.plan_batch(entries, base, "out")


def test_an_output_in_the_way_and_stdout_are_refused(base, tmp_path):
    entries = _entries(tmp_path, {"prompt": "one"})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "0000-one.png").write_bytes(b"x")
    with pytest.raises(OutputError, match="p.jsonl:1: out.0000-one.png exists; pass --overwrite"):
        api.plan_batch(entries, base, "out")
    assert api.plan_batch(entries, base, "out", overwrite=True)[0][0].path.name == "0000-one.png"
    with pytest.raises(InputError, match="-o must be a directory"):
        api.plan_batch(entries, base, "-")
