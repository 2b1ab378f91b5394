"""Each option is declared once (linfusion_cli/schema.py) and the four surfaces come from it: the
flags (and --help), Request's fields, the preset keys and the batch-line keys."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import typer

from linfusion_cli import schema
from linfusion_cli.cli.app import app
from linfusion_cli.errors import PresetError, PromptFileError
from linfusion_cli.io.prompts import PromptEntry, parse_prompts
from linfusion_cli.planning.presets import parse_preset
from linfusion_cli.planning.request import Request

from .cli_helpers import ROOT

OWN = {"generate": {"output"}, "upscale": {"output"}, "batch": {"output", "name"}}  # per command


@pytest.mark.parametrize("command", sorted(OWN))
def test_flags_and_help_are_the_declarations(command):
    params = {p.name: p for p in typer.main.get_command(app).commands[command].params
              if p.param_type_name == "option" and p.name != "help"}
    declared = {o.name: o for o in schema.flag_options() if command in o.commands}
    assert set(params) - OWN[command] == set(declared)
    for name, option in declared.items():
        assert tuple(params[name].opts + params[name].secondary_opts) == option.flags
        assert params[name].help == option.help


def test_request_fields_are_the_declarations():
    assert [f.name for f in dataclasses.fields(Request)] == [o.name for o in schema.plan_options()]
    assert "json" not in {f.name for f in dataclasses.fields(Request)}  # CLI-only: plan=False


def test_every_declared_preset_key_is_read_under_its_rule():
    """A declared key is accepted (and lands in the field of its option); its rule's refusal
    names the file and the key; an undeclared key is refused with the known ones listed."""
    assert parse_preset("steps: 12\nvae_tile_px: 64\nlora: x.safetensors\n", name="p",
                        source="bundled:p").vae_tile == 64
    for option in schema.preset_options():
        with pytest.raises(PresetError, match=f"p.yaml: key '{option.preset}'"):
            parse_preset(f"{option.preset}: [[1]]\n", name="p", source="p.yaml")
    with pytest.raises(PresetError, match=r"unknown key 'vae_tile' \(known: .*vae_tile_px") as err:
        parse_preset("vae_tile: 64\n", name="p", source="p.yaml")
    assert all(o.preset in str(err.value) for o in schema.preset_options())


def test_batch_keys_are_the_declarations():
    declared = {key for o in schema.line_options() for key in o.line}
    entry = parse_prompts(json.dumps({"prompt": "x", "cfg_scale": 3, "seed": -1}) + "\n", "p")[0]
    assert (entry.guidance, entry.seed) == (3.0, None)
    assert {f.name for f in dataclasses.fields(PromptEntry)} == \
        {o.name for o in schema.line_options()} | {"output", "source", "line"}
    with pytest.raises(PromptFileError, match="unknown option --scheduler") as err:
        parse_prompts("--prompt x --scheduler ddim\n", "p")  # declared, but batch lines may not set it
    assert all(f"--{key}" in str(err.value) for key in declared)


NEW_OPTION = textwrap.dedent("""
    from typing import Optional
    from linfusion_cli import schema, validate
    schema.OPTIONS += (schema.Option("sharpness", Optional[float], "Detail boost.", ("--sharpness",),
                                     rule=validate.guidance, preset="sharpness", preset_default=1.0,
                                     line=("sharpness",)),
                       schema.Option("lanes", Optional[int], "Batch only.", ("--lanes",),
                                     rule=validate.steps, commands=("batch",), plan=False))
    import json, typer
    from linfusion_cli.cli.app import app
    from linfusion_cli.cli.options import GenerationOptions
    from linfusion_cli.errors import LinfusionError
    from linfusion_cli.io.prompts import parse_prompts
    from linfusion_cli.planning.presets import parse_preset
    out = {"flag": GenerationOptions(sharpness=2.0).request("x").sharpness,
           "default": parse_preset("", name="p", source="bundled:p").sharpness,
           "preset": parse_preset("sharpness: 3\\n", name="p", source="bundled:p").sharpness,
           "line": parse_prompts('{"prompt": "x", "sharpness": 4}\\n', "p")[0].sharpness,
           "a1111": parse_prompts("--prompt x --sharpness 5\\n", "p")[0].sharpness,
           "help": [p.help for p in typer.main.get_command(app).commands["upscale"].params
                    if p.name == "sharpness"],
           "lanes": [name for name, command in typer.main.get_command(app).commands.items()
                     if "lanes" in {p.name for p in command.params}],
           "lanes_request": "lanes" in vars(GenerationOptions(lanes=2).request("x"))}
    for where, call in (("flag_rule", lambda: GenerationOptions(sharpness=-1.0).request("x")),
                        ("preset_rule", lambda: parse_preset("sharpness: -1\\n", name="p", source="p.yaml")),
                        ("line_rule", lambda: parse_prompts('{"prompt": "x", "sharpness": -1}\\n', "f"))):
        try:
            call()
        except LinfusionError as exc:
            out[where] = str(exc)
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_a_new_option_is_one_declaration():
    """Declared before the package loads, an option is a flag, a Request field, a preset key and
    a batch key at once, checked by its rule on each path."""
    proc = subprocess.run([sys.executable, "-c", NEW_OPTION], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert (out["flag"], out["default"], out["preset"], out["line"], out["a1111"]) == (2.0, 1.0, 3.0, 4.0, 5.0)
    assert out["help"] == ["Detail boost."]
    assert out["lanes"] == ["batch"] and not out["lanes_request"]  # one command's, not the plan's
    assert out["flag_rule"] == "--sharpness must be in [0, 100], got -1.0"
    assert out["preset_rule"] == "p.yaml: key 'sharpness': sharpness must be in [0, 100], got -1"
    assert out["line_rule"] == "f:1: 'sharpness' must be in [0, 100], got -1"
