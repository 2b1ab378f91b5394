"""What defines an image is one declaration: a schema option flagged `defines_image` reaches stage
checkpoints, manifest lines and image records alike; an option not flagged reaches none."""

from __future__ import annotations

import pytest

from linfusion_cli import schema
from linfusion_cli.io import checkpoints, image_identity

from ..cli_helpers import write_preset

FLAGGED = schema.OPTIONS + (schema.Option("device", str, defines_image=True),)
NOT_FLAGGED = schema.OPTIONS + (schema.Option("device", str),)


@pytest.fixture
def plan(cli_env, tmp_path):
    from linfusion_cli import api

    preset = str(write_preset(tmp_path / "tiny.yaml"))
    return api.plan("a lighthouse", model="demo", res=64, steps=2, seed=5, preset=preset)


def _record(plan) -> dict:
    """An image's record as a run writes it (io/metadata), from the plan."""
    stages = [{"width": s.width, "height": s.height, "strength": s.strength, "steps": s.steps,
               "guidance": s.guidance, "scheduler": s.scheduler, "seed": s.seed, "method": s.method,
               "demofusion": None} for s in plan.stages]
    return {"prompt": plan.prompt, "negative": plan.negative, "model": plan.model, "family": plan.family,
            "linfusion": plan.linfusion, "dtype": "fp32", "seed": plan.seed, "init_image": None,
            "adapters": plan.adapters.to_dict(), "weights": image_identity.defining(plan)["weights"],
            "stages": stages}


def test_the_defining_keys_are_the_ones_earlier_versions_wrote(plan):
    assert set(image_identity.defining(plan)) == {"prompt", "negative", "model", "family", "linfusion",
                                                  "dtype", "weights"}
    assert image_identity.same_settings(_record(plan), plan)


def test_a_flagged_option_reaches_checkpoints_manifest_lines_and_records(plan):
    assert "device" not in image_identity.defining(plan)
    assert checkpoints.settings(plan, 0, options=FLAGGED)["device"] == plan.device
    assert image_identity.fingerprint(plan, FLAGGED)["device"] == plan.device
    record = _record(plan)
    assert not image_identity.same_settings(record, plan, FLAGGED)  # an older record lacks it
    written = image_identity.recorded(plan, record, FLAGGED)  # as a run now records it
    assert written["device"] == plan.device and image_identity.same_settings(written, plan, FLAGGED)
    assert not image_identity.same_settings(written | {"device": "elsewhere"}, plan, FLAGGED)


def test_an_option_not_flagged_reaches_none_of_them(plan):
    assert checkpoints.settings(plan, 0, options=NOT_FLAGGED) == checkpoints.settings(plan, 0)
    assert image_identity.fingerprint(plan, NOT_FLAGGED) == image_identity.fingerprint(plan)
    assert image_identity.recorded(plan, _record(plan), NOT_FLAGGED) == _record(plan)
    assert image_identity.same_settings(_record(plan), plan, NOT_FLAGGED)
