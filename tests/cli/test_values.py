"""One rule for every value on every path (flag, preset, batch line), checked before loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from ..cli_helpers import (
    DEMO, LADDER, files_under, make_dir, no_load, one_error, run_subprocess, write_bytes,
    write_preset,
)


VALUES = {
    "steps-zero": (["--steps", "0"], "steps: 0", {"steps": 0}, "steps must be in [1, 1000], got 0"),
    "steps-negative": (["--steps", "-3"], "steps: -3", {"steps": -3}, "steps must be in [1, 1000], got -3"),
    "steps-above-scheduler": (["--steps", "5000"], "steps: 5000", {"steps": 5000},
                              "steps must be in [1, 1000], got 5000"),
    "guidance-inf": (["--guidance", "inf"], "guidance: .inf", {"guidance": 1e999},
                     "guidance must be a finite number, got inf"),
    "guidance-nan": (["--guidance", "nan"], "guidance: .nan", {"guidance": float("nan")},
                     "guidance must be a finite number, got nan"),
    "guidance-huge": (["--guidance", "1e308"], "guidance: 1.0e+308", {"guidance": 1e308},
                      "guidance must be in [0, 100], got 1e+308"),
    "guidance-negative": (["--guidance", "-1"], "guidance: -1", {"guidance": -1},
                          "guidance must be in [0, 100], got -1"),
    "res-zero": (["--res", "0"], None, {"res": 0}, "res must be in [8, 32768], got 0"),
    "seed-too-big": (["--seed", str(2 ** 32)], None, {"seed": 2 ** 32},
                     f"seed must be -1 (random) or in [0, {2 ** 32 - 1}], got {2 ** 32}"),
}


def _preset_args(tmp_path, line):
    return ["--preset", str(write_preset(tmp_path / "p.yaml", "model: demo\nnative: 64\n" + line + "\n"))]


PATHS = [(case, path) for case in VALUES for path in ("flag", "preset", "batch")
         if path != "preset" or VALUES[case][1] is not None]  # presets hold no res or seed


@pytest.mark.parametrize("case,path", PATHS, ids=[f"{c}-{p}" for c, p in PATHS])
def test_bad_values_same_rule_on_every_path(cli, tmp_path, monkeypatch, case, path):
    no_load(monkeypatch)
    flag, preset_line, fields, rule = VALUES[case]
    if path == "flag":
        args = ["generate", "x", "--model", "demo", "--res", "64", *flag]
        if flag[0] == "--res":
            args = ["generate", "x", "--model", "demo", *flag]
    elif path == "preset":
        args = ["generate", "x", "--res", "64", *_preset_args(tmp_path, preset_line)]
    else:
        line = json.dumps({"prompt": "x", **fields}).replace("Infinity", "1e999")
        (tmp_path / "p.jsonl").write_text(line + "\n")
        args = ["batch", "p.jsonl", "--model", "demo", "--res", "64", "-o", "out"]
    result = cli(*args, "--dry-run")
    name, words = rule.split(" ", 1)  # the name is spelled as its path spells it: --steps, 'steps'
    one_error(result, name, words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["flag", "batch"])
@pytest.mark.parametrize("prompt,rule", [("a\0b", "NUL byte"), ("bad \udcff byte", "not valid UTF-8")],
                         ids=["nul", "non-utf8"])
def test_bad_prompt_text_refused_before_loading(cli, tmp_path, monkeypatch, how, prompt, rule):
    no_load(monkeypatch)
    if how == "flag":
        result = cli("generate", prompt, *DEMO, "--res", "64", "-o", "out/")
    else:
        result = cli("batch", "-", *DEMO, "--res", "64", "-o", "out",
                     stdin="fine\n" + json.dumps({"prompt": prompt}) + "\n")
    one_error(result, rule)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_non_utf8_prompt_bytes_through_the_console_script(cli_env, tmp_path):
    proc = run_subprocess([b"linfusion", b"generate", b"caf\xe9 au lait", b"--model", b"demo",
                           b"--res", b"64", b"-o", str(tmp_path / "out/").encode()], cli_env)
    lines = [line for line in proc.stderr.decode().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "UTF-8" in lines[0]
    assert not (tmp_path / "out").exists()


def test_scheduler_needing_a_missing_package_is_found_at_plan_time(cli, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    no_load(monkeypatch)
    one_error(cli("generate", "x", *DEMO, "--res", "64", "--scheduler", "lms", "--dry-run"), "scipy")


def _bomb_png(path: Path) -> Path:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("bomb", "x" * (4 << 20), zip=True)  # 4 MiB of text in a few KiB
    Image.new("RGB", (64, 64)).save(path, pnginfo=info)
    assert path.stat().st_size < 64 * 1024
    return path


LOW = {
    "aspect-nan": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--aspect", "nan:1"], "--aspect"),
    "aspect-absurd": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--aspect", "1000:1"], "--aspect"),
    "max-vram-nan": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--max-vram", "nan"], "--max-vram"),
    "max-vram-inf": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--max-vram", "inf"], "--max-vram"),
    "device-meta": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--device", "meta"], "--device"),
    "linfusion-and-no-linfusion": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--linfusion", "X",
                                              "--no-linfusion"], "--no-linfusion"),
    "aspect-with-width": (lambda t: ["generate", "x", *DEMO, "--aspect", "16:9", "--width", "64",
                                     "--height", "64"], "--aspect"),
    "strengths-empty-item": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--strengths", "0.4,,0.3"],
                             "empty item"),
    "stdout-with-save-stages": (lambda t: ["generate", "x", *DEMO, "--res", "64", "-o", "-", "--save-stages"],
                                "--save-stages"),
    "binary-preset": (lambda t: ["generate", "x", "--res", "64", "--preset",
                                 str(write_bytes(t / "bin.yaml", b"\xff\xfe\x00garbage"))], "bin.yaml"),
    "directory-preset": (lambda t: ["generate", "x", "--res", "64", "--preset",
                                    str(make_dir(t / "config" / "presets" / "dir.yaml"))], "dir.yaml"),
    "huge-name-width": (lambda t: ["batch", str(write_bytes(t / "p.txt", b"a\n")), *DEMO, "--res", "64",
                                   "-o", "out", "--name", "{index:999999999d}.png"], "999"),
    "name-over-255-bytes": (lambda t: ["generate", "x", *DEMO, "--res", "64", "-o", "out/" + "é" * 130 + ".png"],
                            "255"),
    "duplicate-json-key": (lambda t: ["batch", str(write_bytes(t / "p.jsonl", b'{"prompt": "a", "prompt": "b"}\n')),
                                      *DEMO, "--res", "64", "-o", "out"], "given twice"),
    "bad-unet-config": (lambda t: ["generate", "x", "--model", str(_model_folder(t, b"{not json")), "--res",
                                   "64"], "config.json"),
    "unet-config-not-object": (lambda t: ["generate", "x", "--model", str(_model_folder(t, b"[1, 2]")),
                                          "--res", "64"], "JSON object"),
    "png-text-bomb": (lambda t: ["upscale", str(_bomb_png(t / "bomb.png")), "x", *DEMO, "--res", "128"],
                      "bomb.png"),
}


def _model_folder(tmp: Path, unet_config: bytes) -> Path:
    write_bytes(tmp / "model" / "unet" / "config.json", unet_config)
    return tmp / "model"


@pytest.mark.parametrize("case", list(LOW), ids=list(LOW))
def test_low_cases_are_one_line_exit_2(cli, tmp_path, monkeypatch, case):
    no_load(monkeypatch)
    setup, needle = LOW[case]
    args = setup(tmp_path)
    before = files_under(tmp_path)
    result = cli(*args, "--dry-run") if args[0] != "upscale" else cli(*args, "-o", "out/")
    one_error(result, needle)
    assert files_under(tmp_path) == before
    assert not (tmp_path / "out").exists()


def test_seed_range_is_the_same_everywhere(cli, tmp_path):
    top = 2 ** 32 - 1
    plan = json.loads(cli("generate", "x", *DEMO, "--res", "128", "--seed", str(top), "--dry-run",
                          "--json", "--preset", str(write_preset(tmp_path / "l.yaml", LADDER))).out)
    assert plan["seed"] == top
    assert [s["seed"] for s in plan["stages"]] == [top, 0], "stage seeds wrap inside the range"
    random = json.loads(cli("generate", "x", *DEMO, "--res", "64", "--seed", "-1", "--dry-run", "--json").out)
    assert 0 <= random["seed"] <= top
    result = cli("batch", "-", *DEMO, "--res", "64", "-o", "out", "--seed", str(top), "--dry-run", "--json",
                 stdin="a\nb\n" + json.dumps({"prompt": "c", "seed": top}) + "\n")
    assert result.code == 0, result.err
    assert [json.loads(line)["seed"] for line in result.out_lines] == [top, 0, top]


def test_batch_line_size_wins_over_the_command_aspect(cli, tmp_path):
    result = cli("batch", "-", *DEMO, "--res", "64", "--aspect", "2:1", "-o", "out", "--dry-run", "--json",
                 stdin='a\n{"prompt": "b", "width": 64, "height": 64}\n')
    assert result.code == 0, result.err
    sizes = [(p["width"], p["height"]) for p in map(json.loads, result.out_lines)]
    assert sizes == [(64, 32), (64, 64)]
