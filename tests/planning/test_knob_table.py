"""The knob table is the one declaration of the memory knobs: the typed Knobs, the planner's
choices, a preset's rules, the dry run's words and the one excluded combination follow it."""

from __future__ import annotations

import dataclasses

import pytest

from linfusion_cli.errors import PlanError, PresetError
from linfusion_cli.planning import presets
from linfusion_cli.planning.memory import knob_table as table
from linfusion_cli.planning.memory.planner import LOOSEST_FIRST, candidate_plans
from linfusion_cli.planning.memory.walk import Knobs


def test_the_typed_knobs_are_the_tables():
    fields = dataclasses.fields(Knobs)
    assert tuple(f.name for f in fields) == table.NAMES
    for f, knob in zip(fields, table.KNOBS):
        assert f.default == knob.default and type(knob.default) is knob.kind


@pytest.mark.parametrize("knob", table.KNOBS, ids=table.NAMES)
def test_a_preset_takes_every_planned_value_and_refuses_another_type(knob):
    for value in knob.loosest_first():
        if knob.name == "attn_chunk" and value == 0:
            continue  # 0 is the planner's "no LinFusion", never a preset's
        assert presets._check_memory({knob.name: value}, "p.yaml") == ((knob.name, value),)
    wrong = "7" if knob.kind is not str else 7
    with pytest.raises(PresetError, match=f"memory knob '{knob.name}' must be"):
        presets._check_memory({knob.name: wrong}, "p.yaml")


@pytest.mark.parametrize("knob", table.KNOBS, ids=table.NAMES)
def test_the_dry_run_names_every_setting_but_off(knob):
    off = {k.name: k.default for k in table.KNOBS}
    for value in knob.loosest_first():
        said = table.words({**off, knob.name: value})
        named = [w for w in said if w != "vae untiled"]
        assert bool(named) == (value != knob.default), (knob.name, value, said)


def test_every_planned_value_has_a_place_in_the_loosening_order():
    for plan in candidate_plans(4096, 4096, device="cuda") + candidate_plans(2048, 2048, device="cpu"):
        for name in table.NAMES:
            assert getattr(plan, name) in LOOSEST_FIRST[name]


def test_band_wise_and_sequential_offload_are_excluded_in_one_place():
    words = table.excluded("sequential", banded=True)
    assert words and table.excluded("model", banded=True) is None
    assert table.excluded("sequential", banded=False) is None
    plans = candidate_plans(8192, 8192, device="cuda")
    assert not [p for p in plans if p.band_rows and p.offload == "sequential"]
    assert any(p.offload == "sequential" for p in plans) and any(p.band_rows for p in plans)
    with pytest.raises(PlanError) as info:
        candidate_plans(8192, 8192, fixed={"band_rows": 64, "offload": "sequential"})
    assert str(info.value) == words


def test_part_knobs_split_the_unet_from_the_vae():
    unet, vae = table.part_knobs("unet"), table.part_knobs("vae")
    assert "vae_tile_px" in vae and not set(unet) & set(vae)
    assert {"offload", "inplace"} == set(table.NAMES) - set(unet) - set(vae)  # shape both parts
