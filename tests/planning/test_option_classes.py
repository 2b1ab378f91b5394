"""Request and Preset are made from schema.OPTIONS; their stub shows editors the same fields."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from linfusion_cli import schema
from linfusion_cli.planning import option_classes
from linfusion_cli.planning.option_classes import Preset, Request

STUB = Path(option_classes.__file__).with_suffix(".pyi")


def test_the_stub_is_what_the_schema_makes_now():
    """A new or changed option: run the command in the stub's first line."""
    assert STUB.read_text() == option_classes.stub(), f"regenerate {STUB.name}: {STUB.read_text().splitlines()[0]}"


def test_every_declared_option_is_a_field_of_its_class_and_in_the_stub():
    text = STUB.read_text()
    request = {f.name: f for f in dataclasses.fields(Request)}
    assert set(request) == {o.name for o in schema.plan_options()}
    assert {o.name for o in schema.preset_options()} <= {f.name for f in dataclasses.fields(Preset)}
    for name, f in request.items():
        assert f"    {name}: " in text
    assert request["prompt"].default is dataclasses.MISSING and "    prompt: str\n" in text
