"""api.write_image and api.check_image make the CLI's checks for a Python caller: an existing
output, a preview over the image, a held lock, a finished image under resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from linfusion_cli import api
from linfusion_cli.errors import OutputError
from linfusion_cli.io import locks

from ..cli_helpers import write_preset


@pytest.fixture
def plan(cli_env, tmp_path):
    preset = str(write_preset(tmp_path / "tiny.yaml"))
    return api.plan("a lighthouse", model="demo", res=64, steps=2, seed=5, preset=preset)


def test_an_existing_output_is_refused_before_any_model(plan, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.png").write_bytes(b"someone's file")
    with pytest.raises(OutputError, match="exists"):
        api.write_image(plan, None, "out/x.png")  # no model: the check comes first
    assert (tmp_path / "out" / "x.png").read_bytes() == b"someone's file"


def test_a_preview_over_the_image_is_refused(cli_env, tmp_path):
    preset = str(write_preset(tmp_path / "tiny.yaml"))
    (tmp_path / "out").mkdir()
    plan = api.plan("x", model="demo", res=64, steps=2, seed=5, preset=preset, preview="out/x.png")
    with pytest.raises(OutputError, match="preview"):
        api.check_image(plan, "out/x.png")
    assert api.check_image(plan, "out/y.png").path.name == "y.png"


def test_a_held_lock_stops_a_second_run(plan, tmp_path):
    (tmp_path / "out").mkdir()
    with locks.output_lock(Path("out/x.png")):
        with pytest.raises(OutputError, match="is being made by"):
            api.write_image(plan, None, "out/x.png")


def test_resume_leaves_a_finished_image_and_overwrite_remakes_it(plan, tmp_path):
    model = api.load(plan)
    made = api.write_image(plan, model, "out/")
    path = Path(made["path"])
    assert path.parent == Path("out") and path.is_file() and made["seed"] == 5
    job = api.check_image(plan, "out/", resume=True)
    assert job.finished and job.path == path and job.fmt == "png"
    before = path.stat().st_mtime_ns
    assert api.write_image(plan, model, "out/", resume=True) == {"path": str(path), "skipped": True}
    assert path.stat().st_mtime_ns == before
    with pytest.raises(OutputError, match="exists"):
        api.write_image(plan, model, str(path))
    assert api.write_image(plan, model, str(path), overwrite=True)["path"] == str(path)
