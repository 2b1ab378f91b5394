"""Every value rule (validate.py), config bound (bounds.py) and input-file check (inputs.py),
as a table: each rule's edges on both sides and the one line a broken value gets."""

from __future__ import annotations

import math
import os
import socket

import pytest

from linfusion_cli import bounds, inputs, validate
from linfusion_cli.errors import InputError, ModelNotFoundError, PlanError

V = validate
# (rule, value accepted, what it gives back); the name in messages is each rule's default
ACCEPTED = [
    (V.steps, 1, 1), (V.steps, V.MAX_STEPS, V.MAX_STEPS), (V.steps, 20.0, 20),
    (V.guidance, 0, 0.0), (V.guidance, V.MAX_GUIDANCE, V.MAX_GUIDANCE),
    (V.strength, 1, 1.0), (V.strength, 1e-6, 1e-6),
    (V.seed, 0, 0), (V.seed, V.SEED_MAX, V.SEED_MAX),
    (lambda v: V.side(v, "width"), 8, 8), (lambda v: V.side(v, "width"), V.MAX_SIDE, V.MAX_SIDE),
    (V.max_vram, 0.5, 0.5), (V.max_vram, V.MAX_VRAM_GIB, V.MAX_VRAM_GIB),
    (V.gpu, " RTX 4090", "rtx4090"), (V.gpu, "h100-sxm", "h100"),
    (V.vae_tile, 0, 0), (V.vae_tile, 512, 512), (V.vae_tile, V.MIN_VAE_TILE, V.MIN_VAE_TILE),
    (lambda v: V.vae_tile_count(v, 16384, 16384), 128, None),  # 16384 tiles: the most
    (lambda v: V.vae_tile_count(v, 16384, 16384), 0, None),
    (V.aspect, "16:9", (16.0, 9.0)), (V.aspect, "1:64", (1.0, 64.0)),
    (V.text, "", ""), (V.text, "é" * 10, "é" * 10),
    (V.strengths_text, "0.4, 0.3", (0.4, 0.3)),
    (V.strengths, [0.5, 1], (0.5, 1.0)),
    (V.scheduler, "ddim", "ddim"), (V.method, "demofusion", "demofusion"),
    (lambda v: V.finite(v, "scale"), -2, -2.0),
    (lambda v: V.source(v, "model"), "org/name", "org/name"),
    (V.loras, "a.safetensors:0.5", ("a.safetensors:0.5",)), (V.loras, ["a", "b"], ("a", "b")),
    (V.world_size, 1, 1), (V.world_size, 1024, 1024),
    (V.parallel, "bands", "bands"),
    (V.device, "cuda:7", "cuda:7"), (V.device, "auto", "auto"),
    (V.preview_method, "taesd", "taesd"), (V.preview_size, 64, 64), (V.preview_every, 1, 1),
    (V.progress, "json", "json"),
]
# (rule, value refused, words its one line holds)
REFUSED = [
    (V.steps, 0, "steps must be in [1, 1000], got 0"), (V.steps, 1001, "got 1001"),
    (V.steps, 2.5, "steps must be an integer"), (V.steps, True, "steps must be an integer"),
    (V.steps, "20", "must be an integer, got '20'"),
    (V.guidance, -0.1, "guidance must be in [0, 100]"), (V.guidance, math.nan, "finite number"),
    (V.guidance, math.inf, "finite number"),
    (V.strength, 0, "strength must be in (0, 1]"), (V.strength, 1.01, "got 1.01"),
    (V.seed, -1, "seed must be -1 (random) or in [0, 4294967295]"), (V.seed, 2 ** 32, "got 4294967296"),
    (lambda v: V.side(v, "width"), 7, "width must be in [8, 32768]"),
    (lambda v: V.side(v, "width"), 32769, "got 32769"),
    (V.max_vram, 0, "max_vram must be in (0, 4096]"), (V.max_vram, -1, "max_vram"),
    (V.gpu, "voodoo2", "unknown gpu 'voodoo2'"), (V.gpu, "", "gpu must be a GPU name"),
    (V.vae_tile, 12, "multiple of 8"), (V.vae_tile, -8, "vae_tile must be in"),
    (V.vae_tile, 56, "of at least 64, got 56"),
    (lambda v: V.vae_tile_count(v, 16384, 16384), 120, "--vae-tile 120 cuts 16384x16384 into 18769 tiles"),
    (V.aspect, "16x9", "aspect must look like 16:9"), (V.aspect, "0:1", "two positive numbers"),
    (V.aspect, "nan:1", "two positive numbers"), (V.aspect, "65:1", "beyond 64:1"),
    (V.text, 5, "prompt must be a string"), (V.text, "a\0b", "NUL byte"),
    (V.text, "\udcff", "not valid UTF-8"), (V.text, "x" * (V.MAX_TEXT + 1), "the limit is 100000"),
    (lambda v: V.text(v, empty_ok=False), "  ", "prompt is empty"),
    (V.strengths_text, "", "--strengths is empty"), (V.strengths_text, "0.4,,0.3", "empty item"),
    (V.strengths_text, "0.4;0.3", "numbers separated by commas"), (V.strengths_text, "0.4,2", "in (0, 1]"),
    (V.strengths, [], "strengths must be a list"), (V.strengths, 0.5, "strengths must be a list"),
    (V.strengths, [0.5, 0], "strengths must be in (0, 1]"),
    (V.scheduler, "heun", "unknown scheduler 'heun'"), (V.method, "tile", "unknown method 'tile'"),
    (lambda v: V.finite(v, "scale"), math.inf, "scale must be a finite number"),
    (lambda v: V.finite(v, "scale"), True, "scale must be a finite number"),
    (lambda v: V.source(v, "model"), "", "model must be a path or hub id"),
    (V.loras, [], "lora must be FILE|ID[:WEIGHT]"), (V.loras, ["a", ""], "lora must be"),
    (V.world_size, 0, "1 .. 1024"), (V.world_size, 2.0, "whole number"),
    (V.parallel, "rows", "--parallel must be images or bands"),
    (V.device, "meta", "--device must be auto, cpu, mps, cuda or cuda:N"),
    (V.device, "cuda:1234", "cuda:N"),
    (V.preview_method, "vae", "--preview-method must be auto, latent2rgb or taesd"),
    (V.preview_size, 63, "--preview-size must be in [64, 8192]"),
    (V.preview_every, 0, "--preview-every must be in [1, 1000]"),
    (V.progress, "tty", "--progress must be bar, json or none"),
]


@pytest.mark.parametrize("rule, value, expected", ACCEPTED)
def test_a_value_within_its_rule_is_kept(rule, value, expected):
    assert rule(value) == expected


@pytest.mark.parametrize("rule, value, words", REFUSED)
def test_a_value_outside_its_rule_is_one_line_naming_it(rule, value, words):
    with pytest.raises(PlanError) as info:
        rule(value)
    message = str(info.value)
    assert words in message and "\n" not in message


def test_every_rule_of_validate_is_in_the_table():
    """A new rule in validate.py comes with its rows here."""
    tested = {getattr(r, "__name__", "") for r, *_ in ACCEPTED + REFUSED}
    tested |= {"side", "finite", "source", "text", "vae_tile_count"}  # through the lambdas above
    helpers = {"in_range", "scheduler_needs", "aspect_text", "json_object", "file_name", "shown",
               "read_bounded", "import_module"}
    rules = {name for name, obj in vars(V).items() if callable(obj) and not name.startswith("_")
             and getattr(obj, "__module__", "") == V.__name__ and not isinstance(obj, type)}
    assert rules - tested - helpers == set()


def test_file_names_and_json_objects(tmp_path):
    assert V.file_name("a" * V.NAME_MAX, "output") == "a" * V.NAME_MAX
    for bad, words in (("a\0b", "NUL byte"), ("é" * 128, "is 256 bytes; the limit is 255")):
        with pytest.raises(InputError, match=words):
            V.file_name(bad, "output")
    good = tmp_path / "c.json"
    good.write_text('{"a": 1}')
    assert V.json_object(good, "config") == {"a": 1}
    for text, words in (("[1]", "must be a JSON object"), ("{", "is not readable JSON")):
        good.write_text(text)
        with pytest.raises(InputError, match=words):
            V.json_object(good, "config")


def test_model_configs_are_bounded():
    assert bounds.check_config({"layers_per_block": 2, "block_out_channels": [320, 640]}, "unet")
    for config, words in (({"layers_per_block": 17}, "'layers_per_block' is 17; the limit is 16"),
                          ({"block_out_channels": [1] * 17}, "has 17 items"),
                          ({"x": [[1] * 17]}, "holds a list over 16 items"),
                          ({"channels": 1 << 21}, "the limit is 1048576")):
        with pytest.raises(InputError, match=words):
            bounds.check_config(config, "unet")


def test_yaml_is_bounded_before_it_is_built():
    bounds.check_yaml("a: 1\nb: [1, 2]\n", "preset", InputError)
    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcd", "bcde"))
    for text in (bomb, "a: " + "[" * 40 + "]" * 40, "a: 1\na: 2\n"):
        with pytest.raises(InputError):
            bounds.check_yaml(text, "preset", InputError)


def test_input_files_are_regular_small_and_utf8(tmp_path):
    small = tmp_path / "p.yaml"
    small.write_bytes("\ufeffmodel: demo\n".encode("utf-8"))
    assert inputs.read_bounded(small, "preset") == "model: demo\n"
    with pytest.raises(ModelNotFoundError, match="not found"):
        inputs.read_bounded(tmp_path / "none.yaml", "preset")
    with pytest.raises(InputError, match="is a directory, not a regular file"):
        inputs.read_bounded(tmp_path, "preset")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="is a FIFO"):
        inputs.read_bounded(fifo, "preset")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "s"))
        assert inputs.kind_of(tmp_path / "s") == "a socket"
    small.write_bytes(b"\xff\xfe bad")
    with pytest.raises(InputError, match="not UTF-8"):
        inputs.read_bounded(small, "preset")
    small.write_bytes(b"x" * 65)
    with pytest.raises(InputError, match="over 0 MiB"):
        inputs.read_bounded(small, "preset", limit=64)


def test_home_is_never_the_filesystem_root(monkeypatch, tmp_path):
    import sys
    import types

    monkeypatch.setenv("HOME", str(tmp_path))
    assert inputs.home() == tmp_path
    for value in ("/", ""):
        monkeypatch.setenv("HOME", value)
        entry = types.SimpleNamespace(pw_dir="/home/u")
        monkeypatch.setitem(sys.modules, "pwd", types.SimpleNamespace(getpwuid=lambda uid: entry))
        assert str(inputs.home()) == "/home/u"  # the password database's
        entry.pw_dir = "/"
        with pytest.raises(InputError, match="HOME is empty or /"):
            inputs.home()
