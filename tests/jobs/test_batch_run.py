"""api.run_batch makes a planned batch for a Python caller as the CLI does: each image recorded in
the manifest as it is made, what is done skipped without loading, one failure reported and the
rest made."""

from __future__ import annotations

import json

import pytest

from linfusion_cli import api
from linfusion_cli.io.manifest import MANIFEST_NAME
from linfusion_cli.io.prompts import read_prompt_file

from ..cli_helpers import write_preset


class Seen(api.BatchReport):
    """Every callback a run makes, in order."""

    def __init__(self):
        self.calls = []

    def skipped(self, job, k, why):
        self.calls.append(("skipped", job.index, why))

    def made(self, job, result):
        self.calls.append(("made", job.index, result["path"]))

    def failed(self, job, error):
        self.calls.append(("failed", job.index, str(error)))


@pytest.fixture
def batch(cli_env, tmp_path):
    preset = str(write_preset(tmp_path / "tiny.yaml"))
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "one", "seed": 1}) + "\n" + json.dumps({"prompt": "two", "seed": 2}) + "\n")
    return read_prompt_file(str(path)), api.Request(prompt="", model="demo", res=64, steps=2, preset=preset)


def _manifest_lines(folder):
    return [json.loads(line) for line in (folder / MANIFEST_NAME).read_text().splitlines()]


def test_a_batch_is_made_and_recorded_then_a_second_run_skips_it_without_loading(batch, tmp_path):
    entries, base = batch
    jobs, manifest = api.plan_batch(entries, base, "out")
    seen = Seen()
    assert api.run_batch(jobs, manifest, api.load, report=seen) == 0
    manifest.close()
    assert seen.calls == [("made", 0, "out/0000-one.png"), ("made", 1, "out/0001-two.png")]
    assert [row["index"] for row in _manifest_lines(tmp_path / "out")] == [0, 1]

    def no_load(plan):
        raise AssertionError("nothing to make: the model must not load")
    again, manifest = api.plan_batch(entries, base, "out", resume=True)
    seen = Seen()
    assert api.run_batch(again, manifest, no_load, resume=True, report=seen) == 0
    manifest.close()
    assert seen.calls == [("skipped", 0, "done"), ("skipped", 1, "done")]


def test_one_failing_image_is_reported_and_released_and_the_next_is_made(batch, tmp_path, monkeypatch):
    entries, base = batch
    jobs, manifest = api.plan_batch(entries, base, "out")
    real = api.generate_file

    def first_fails(plan, *args, **kwargs):
        if plan.prompt == "one":
            raise OSError("disk full")
        return real(plan, *args, **kwargs)
    monkeypatch.setattr(api, "generate_file", first_fails)
    seen = Seen()
    assert api.run_batch(jobs, manifest, api.load, report=seen) == 1
    manifest.close()
    assert seen.calls == [("failed", 0, "disk full"), ("made", 1, "out/0001-two.png")]
    assert [row["index"] for row in _manifest_lines(tmp_path / "out")] == [1]
    assert not (tmp_path / "out" / "0000-one.png").exists()


def test_a_model_that_does_not_load_leaves_no_folder_it_made(batch, tmp_path):
    entries, base = batch
    jobs, manifest = api.plan_batch(entries, base, "out/deep")

    def fails(plan):
        raise OSError("no such model")
    with pytest.raises(OSError, match="no such model"):
        api.run_batch(jobs, manifest, fails)
    manifest.close()
    assert not (tmp_path / "out").exists()
