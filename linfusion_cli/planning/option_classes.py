"""Request and Preset: dataclasses with one field per declared option (schema.OPTIONS).

They are made from the schema, so a new option is one declaration; `option_classes.pyi`, written
by `python -m linfusion_cli.planning.option_classes`, shows their fields to editors and type
checkers, which cannot read make_dataclass (tests/planning/test_option_classes.py keeps it true).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, make_dataclass

from ..schema import plan_options, preset_options

# What the user asked for: one field per declared option (schema.OPTIONS with plan=True), each
# None by default, meaning "the preset's value". api.plan's keywords are these fields.
Request = make_dataclass("Request", [(o.name, o.type, field(default=o.default)) for o in plan_options()],
                         frozen=True, namespace={"__doc__": "What the user asked for; None: the preset's value."})
Request.__module__ = __name__


@dataclass(frozen=True)
class PresetOwnKeys:
    """The keys only a preset has (no flag sets them); Preset adds one field per option key."""

    name: str
    source: str
    description: str = ""
    family: str = "sd15"
    native: int | None = None  # short side of the base stage, px (None: the family's trained size)
    memory: tuple = ()  # forced memory knobs as (name, value) pairs, e.g. (("offload", "model"),)
    cosine_scale_1: float = 3.0  # demofusion settings (the official pipeline's defaults)
    cosine_scale_2: float = 1.0
    cosine_scale_3: float = 1.0
    gaussian_sigma: float = 1.0


# A validated preset: its own keys, and every option a preset may set (schema.OPTIONS' `preset`
# keys), as a field named like the Request's, defaulting to the option's `preset_default`.
Preset = make_dataclass("Preset", [(o.name, o.type, field(default=o.preset_default)) for o in preset_options()],
                        bases=(PresetOwnKeys,), frozen=True,
                        namespace={"__doc__": "A validated preset; a flag overrides any option key."})
Preset.__module__ = __name__


def _type_text(tp) -> str:
    """A field's type as a stub writes it (PresetOwnKeys' are already text: `from __future__`)."""
    if isinstance(tp, str):
        return tp
    return tp.__name__ if isinstance(tp, type) else repr(tp).replace("typing.", "")


def _class_text(cls, base=None) -> list[str]:
    """`cls`'s own fields (those of `base` left to it), with `= ...` where there is a default."""
    inherited = {f.name for f in dataclasses.fields(base)} if base is not None else set()
    lines = ["@dataclass(frozen=True)", f"class {cls.__name__}{f'({base.__name__})' if base else ''}:"]
    for f in dataclasses.fields(cls):
        if f.name not in inherited:
            missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            lines.append(f"    {f.name}: {_type_text(f.type)}{'' if missing else ' = ...'}")
    return lines


def stub() -> str:
    """The .pyi text: each class's fields and types, as make_dataclass made them."""
    parts = ["# Written by `python -m linfusion_cli.planning.option_classes > linfusion_cli/planning/option_classes.pyi`;",
             "# do not edit: the fields come from schema.OPTIONS.",
             "from dataclasses import dataclass",
             "from typing import Optional", "", ""]
    parts += _class_text(Request) + ["", ""] + _class_text(PresetOwnKeys) + ["", ""]
    parts += _class_text(Preset, base=PresetOwnKeys) + ["", "", "def stub() -> str: ..."]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(stub(), end="")
