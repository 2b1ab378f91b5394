"""Hostile and careless input: refused at plan time with one line, or survived without losing work.

One test (or one parametrized table) per class of issue 14.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from linfusion_cli.io.metadata import read_metadata

from ..cli_helpers import Result, files_under, run_subprocess, write_preset


DEMO = ("--model", "demo", "--steps", "2")
LADDER = "description: two stages\nmodel: demo\nnative: 64\nsteps: 2\nstrengths: [0.5]\n"


def one_error(result: Result, code: int, *needles: str) -> str:
    assert result.code == code, (result.code, result.err)
    assert len(result.err_lines) == 1, result.err
    for needle in needles:
        assert needle in result.err_lines[0], (needle, result.err_lines[0])
    assert "unexpected" not in result.err_lines[0]
    return result.err_lines[0]


def no_load(monkeypatch):
    """Fail the test if a model is loaded (the check had to come before)."""
    from linfusion_cli.cli import common

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(common, "load", refuse)


# ---------------------------------------------------------------- batch outputs stay inside -o


ESCAPES = {
    "parent": ('{"prompt": "a", "output": "../../x.png"}', "leaves the output folder"),
    "absolute": ('{"prompt": "a", "output": "ABS"}', "absolute"),
    "folder": ('{"prompt": "a", "output": "subdir/"}', "not a folder"),
    "dot": ('{"prompt": "a", "output": "."}', "not a folder"),
    "nul": ('{"prompt": "a", "output": "a\\u0000b.png"}', "NUL"),
    "long-name": ('{"prompt": "a", "output": "' + "n" * 300 + '.png"}', "255"),
    "symlink-out": ('{"prompt": "a", "output": "link/x.png"}', "leaves the output folder"),
    "duplicate": ('{"prompt": "a", "output": "x.png"}\n{"prompt": "b", "output": "sub/../x.png"}',
                  "also line 1"),
    "a1111-parent": ('--prompt a --output ../x.png', "leaves the output folder"),
}


@pytest.mark.parametrize("case", list(ESCAPES), ids=list(ESCAPES))
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_batch_output_stays_inside_the_folder(cli, tmp_path, monkeypatch, case, overwrite):
    no_load(monkeypatch)
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    victim = tmp_path / "x.png"
    victim.write_bytes(b"precious")
    (out / "link").symlink_to(outside)
    line, needle = ESCAPES[case]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(line.replace("ABS", str(victim)) + "\n")
    before = files_under(tmp_path)
    result = cli("batch", str(prompts), *DEMO, "--res", "64", "-o", str(out),
                 *(["--overwrite"] if overwrite else []))
    message = one_error(result, 2, needle)
    line_no = 2 if case == "duplicate" else 1
    assert message.startswith(f"error: {prompts}:{line_no}:"), message
    assert files_under(tmp_path) == before
    assert victim.read_bytes() == b"precious"


def test_batch_output_inside_the_folder_is_fine(cli, tmp_path):
    """Subfolders and '..' that stay inside are accepted (made only when the run starts)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "output": "sub/deeper/../x.png"}\n')
    result = cli("batch", str(prompts), *DEMO, "--res", "64", "-o", "out", "--dry-run")
    assert result.code == 0, result.err
    assert not (tmp_path / "out").exists(), "a dry run creates nothing"
    result = cli("batch", str(prompts), *DEMO, "--res", "64", "-o", "out", "-q")
    assert result.code == 0, result.err
    assert result.out_lines == [str(Path("out") / "sub" / "x.png")]
    assert (tmp_path / "out" / "sub" / "x.png").is_file()


# ---------------------------------------------------------------- one rule for every value, on every path


# (flag args, preset line, batch JSON fields, the rule's words)
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
    one_error(result, 2, name, words)
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
    one_error(result, 2, rule)
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
    one_error(cli("generate", "x", *DEMO, "--res", "64", "--scheduler", "lms", "--dry-run"), 2, "scipy")


# ---------------------------------------------------------------- low: one-line errors, conflicts


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
                                 str(_write_bytes(t / "bin.yaml", b"\xff\xfe\x00garbage"))], "bin.yaml"),
    "directory-preset": (lambda t: ["generate", "x", "--res", "64", "--preset",
                                    str(_mkdir(t / "config" / "presets" / "dir.yaml"))], "dir.yaml"),
    "huge-name-width": (lambda t: ["batch", str(_write_bytes(t / "p.txt", b"a\n")), *DEMO, "--res", "64",
                                   "-o", "out", "--name", "{index:999999999d}.png"], "999"),
    "name-over-255-bytes": (lambda t: ["generate", "x", *DEMO, "--res", "64", "-o", "out/" + "é" * 130 + ".png"],
                            "255"),
    "duplicate-json-key": (lambda t: ["batch", str(_write_bytes(t / "p.jsonl", b'{"prompt": "a", "prompt": "b"}\n')),
                                      *DEMO, "--res", "64", "-o", "out"], "given twice"),
    "bad-unet-config": (lambda t: ["generate", "x", "--model", str(_model_folder(t, b"{not json")), "--res",
                                   "64"], "config.json"),
    "unet-config-not-object": (lambda t: ["generate", "x", "--model", str(_model_folder(t, b"[1, 2]")),
                                          "--res", "64"], "JSON object"),
    "png-text-bomb": (lambda t: ["upscale", str(_bomb_png(t / "bomb.png")), "x", *DEMO, "--res", "128"],
                      "bomb.png"),
}


def _write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _model_folder(tmp: Path, unet_config: bytes) -> Path:
    _write_bytes(tmp / "model" / "unet" / "config.json", unet_config)
    return tmp / "model"


@pytest.mark.parametrize("case", list(LOW), ids=list(LOW))
def test_low_cases_are_one_line_exit_2(cli, tmp_path, monkeypatch, case):
    no_load(monkeypatch)
    setup, needle = LOW[case]
    args = setup(tmp_path)
    before = files_under(tmp_path)
    result = cli(*args, "--dry-run") if args[0] != "upscale" else cli(*args, "-o", "out/")
    one_error(result, 2, needle)
    assert files_under(tmp_path) == before
    assert not (tmp_path / "out").exists()


def test_broken_user_presets_do_not_break_presets_list(cli, tmp_path):
    presets = tmp_path / "config" / "presets"
    _write_bytes(presets / "binary.yaml", b"\xff\xfe\x00")
    _mkdir(presets / "folder.yaml")
    write_preset(presets / "mine.yaml", "description: my own\nmodel: demo\n")
    result = cli("presets", "list")
    assert result.code == 0, result.err
    names = {line.split()[0]: line for line in result.out_lines}
    assert "my own" in names["mine"]
    assert "unusable" in names["binary"]
    assert "sd15" in names


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


# ---------------------------------------------------------------- collisions before any model loads


@pytest.mark.parametrize("kind", ["symlink", "dangling", "fifo", "stage-file"])
def test_output_collisions_found_before_loading(cli, tmp_path, monkeypatch, kind):
    no_load(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    target = out / "final.png"
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    args = []
    if kind == "symlink":
        target.symlink_to(victim)
    elif kind == "dangling":
        target.symlink_to(tmp_path / "nowhere.png")
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        (out / "final.png.stage1-64x64.png").write_bytes(b"precious")
        args = ["--save-stages", "--preset", str(write_preset(tmp_path / "l.yaml", LADDER))]
    for extra in ([], ["--overwrite"]) if kind != "stage-file" else ([],):
        result = cli("generate", "x", *DEMO, "--res", "128", "-o", str(target), *args, *extra)
        one_error(result, 2, "final")
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "nowhere.png").exists()


# ---------------------------------------------------------------- a batch survives one entry's failure


def test_batch_entry_failure_does_not_stop_the_others(cli, tmp_path, monkeypatch):
    from linfusion_cli import api
    from linfusion_cli.errors import OutOfMemoryError

    real = api.generate_file

    def flaky(plan, model, **kwargs):
        if plan.prompt == "b":
            raise OutOfMemoryError("stage 1 ran out of device memory")
        if plan.prompt == "c":
            raise RuntimeError("a bug in a library")
        return real(plan, model, **kwargs)

    monkeypatch.setattr(api, "generate_file", flaky)
    result = cli("batch", "-", *DEMO, "--res", "64", "-o", "out", "-q", stdin="a\nb\nc\nd\n")
    assert result.code == 1, result.err
    assert len(result.err_lines) == 2, result.err
    assert result.err_lines[0].startswith("error: <stdin>:2: stage 1 ran out")
    assert result.err_lines[1].startswith("error: <stdin>:3: a bug in a library (RuntimeError")
    made = sorted(p.name for p in files_under(tmp_path / "out") if p.suffix == ".png")
    assert made == ["0000-a.png", "0003-d.png"]
    assert result.out_lines == [str(Path("out") / n) for n in made]
    recorded = [json.loads(line)["index"] for line in (tmp_path / "out" / "linfusion-manifest.jsonl")
                .read_text().splitlines()]
    assert recorded == [0, 3]  # only the finished images are in the manifest


# ---------------------------------------------------------------- failed writes and free space


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_disk_full_is_one_line_exit_1_and_nothing_left(cli, tmp_path, monkeypatch, fmt):
    from linfusion_cli.io import images

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(images.os, "fsync", full)
    result = cli("generate", "x", *DEMO, "--res", "64", "-q", "-o", f"out/x.{fmt}")
    one_error(result, 1, "x." + fmt, "no space left")
    assert files_under(tmp_path / "out") == []


def test_tiff_encoder_failure_is_one_line(cli, tmp_path, monkeypatch):
    real = Image.Image.save

    def broken(self, fp, format=None, **kwargs):
        if format == "TIFF":
            raise RuntimeError("tiff codec initialization failed")
        return real(self, fp, format, **kwargs)

    monkeypatch.setattr(Image.Image, "save", broken)
    result = cli("generate", "x", *DEMO, "--res", "64", "-q", "-o", "out/x.tiff")
    one_error(result, 1, "x.tiff", "disk full")
    assert files_under(tmp_path / "out") == []


@pytest.mark.slow
def test_full_stdout_is_one_line_exit_1(cli_env, tmp_path):
    with open("/dev/full", "wb") as full:
        proc = __import__("subprocess").run(
            ["linfusion", "generate", "x", "--model", "demo", "--steps", "2", "--res", "64", "-q", "-o", "-"],
            env=cli_env, stdout=full, stderr=-1, stdin=-3, timeout=600)
    lines = [line for line in proc.stderr.decode().splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and "stdout" in lines[0] and "space" in lines[0]


def test_preflight_refuses_a_disk_too_small(cli, tmp_path, monkeypatch):
    from linfusion_cli.io import targets

    no_load(monkeypatch)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(targets.shutil, "disk_usage", lambda p: usage._replace(free=3 << 20))
    result = cli("generate", "x", *DEMO, "--res", "1024", "--strengths", "0.5", "--format", "tiff",
                 "-o", "out/")
    one_error(result, 1, "MiB free", "1024x1024 tiff")
    assert files_under(tmp_path / "out") == []
    # JPEG at 1024 px fits the same room (bounded at half the raw size + 1 MiB)
    assert targets.image_bound(1024, 1024, "jpg") < (3 << 20) < targets.image_bound(1024, 1024, "tiff")


# ---------------------------------------------------------------- NaN / inf after a stage


def _poison(monkeypatch, part: str, when):
    """Make `part`'s last layer return NaN whenever when(layer, output) holds."""
    from linfusion_cli.cli import common

    real = common.load

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        layer = model.pipe.vae.decoder.conv_out if part == "vae" else model.pipe.unet.conv_out
        layer.register_forward_hook(lambda m, i, o: o * float("nan") if when(m, o) else o)
        return model

    monkeypatch.setattr(common, "load", load)


def test_nan_from_the_vae_is_retried_in_float32(cli, tmp_path, monkeypatch):
    import torch

    _poison(monkeypatch, "vae", lambda m, o: m.weight.dtype != torch.float32)
    result = cli("generate", "x", *DEMO, "--res", "64", "--dtype", "bf16", "-v", "-o", "out/x.png")
    assert result.code == 0, result.err
    assert "NaN/inf from the VAE; retrying it in float32" in result.err
    with Image.open(tmp_path / "out" / "x.png") as im:
        assert max(im.convert("L").getextrema()) > 0, "not the black image NaN turns into"


def test_nan_even_in_float32_keeps_the_previous_stage(cli, tmp_path, monkeypatch):
    _poison(monkeypatch, "unet", lambda m, o: o.shape[-1] == 16)  # stage 2: 128 px, latents 16 px
    preset = write_preset(tmp_path / "l.yaml", LADDER)
    result = cli("generate", "x", "--preset", str(preset), "--res", "128", "-q", "-o", "out/x.png")
    one_error(result, 1, "stage 2", "UNET produced NaN/inf", "stage 1's image is kept")
    kept = tmp_path / "out" / "x.png.stage1-64x64.png"
    assert files_under(tmp_path / "out") == [kept]
    assert read_metadata(kept)["record"]["stages"][0]["width"] == 64


# ---------------------------------------------------------------- messages that tell the truth


def test_corrupt_local_model_folder_is_diagnosed_as_local(cli, tmp_path, cli_cache):
    """A broken local folder is not sent to `huggingface-cli download <local path>`."""
    assert cli("generate", "x", *DEMO, "--res", "64", "-q", "-o", "warm.png").code == 0  # builds the demo
    demo = next(p for p in cli_cache.iterdir() if p.name.startswith("demo"))
    broken = tmp_path / "broken"
    shutil.copytree(demo, broken)
    for weights in broken.glob("unet/*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])  # truncated weights
    result = cli("generate", "x", "--model", str(broken), "--no-linfusion", "--steps", "2", "--res", "64",
                 "-q", "-o", "out/")
    line = one_error(result, 2, "local model folder", "broken")
    assert "huggingface-cli" not in line and "download" not in line


@pytest.mark.slow
def test_closed_stdin_and_stdout_are_one_line(cli_env, tmp_path):
    import subprocess
    import sys

    script = ("import os, sys; os.close(0); os.close(1); "
              "from linfusion_cli.cli.app import run; sys.exit(run(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", script, "generate", *DEMO, "--res", "64", "-o", "-"],
                          env=cli_env, stderr=subprocess.PIPE, timeout=600)
    lines = [line for line in proc.stderr.decode().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "stdin" in lines[0]
    proc = subprocess.run([sys.executable, "-c", script, "generate", "x", *DEMO, "--res", "64", "-q", "-o", "-"],
                          env=cli_env, stderr=subprocess.PIPE, timeout=600)
    lines = [line for line in proc.stderr.decode().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "stdout is closed" in lines[0]


@pytest.mark.parametrize("entry", [{"module_name": "a.attn1", "dim_n": "many", "heads": 8},
                                   {"module_name": "a.attn1", "dim_n": 320},
                                   {"module_name": "a.attn1", "dim_n": 320, "heads": 0},
                                   {"module_name": "a.attn1", "dim_n": 320, "heads": 8, "projection_mid_dim": "x"},
                                   ["a.attn1", None, 8], "a.attn1"])
def test_malformed_linfusion_config_fields_are_one_line(entry):
    from linfusion_cli.attention.checkpoint import parse_modules_list
    from linfusion_cli.errors import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match="unreadable modules_list entry"):
        parse_modules_list({"modules_list": [{"module_name": "ok.attn1", "dim_n": 320, "heads": 8}, entry]})


def test_batch_line_size_wins_over_the_command_aspect(cli, tmp_path):
    result = cli("batch", "-", *DEMO, "--res", "64", "--aspect", "2:1", "-o", "out", "--dry-run", "--json",
                 stdin='a\n{"prompt": "b", "width": 64, "height": 64}\n')
    assert result.code == 0, result.err
    sizes = [(p["width"], p["height"]) for p in map(json.loads, result.out_lines)]
    assert sizes == [(64, 32), (64, 64)]


def test_preflight_counts_every_image_of_a_batch(cli, tmp_path, monkeypatch):
    from linfusion_cli.io import targets

    no_load(monkeypatch)
    one = targets.image_bound(512, 512, "png")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(targets.shutil, "disk_usage", lambda p: usage._replace(free=3 * one))
    ok = cli("batch", "-", *DEMO, "--res", "512", "-o", "out", "--dry-run", stdin="a\nb\nc\n")
    assert ok.code == 0, ok.err
    result = cli("batch", "-", *DEMO, "--res", "512", "-o", "out", stdin="a\nb\nc\nd\n")
    one_error(result, 1, "MiB free", "4 images")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field", ["model", "preset", "linfusion", "negative", "prompt"])
def test_nul_bytes_in_any_name_refused_at_plan_time(field):
    """The library path too: a NUL in a path or name never reaches the filesystem or a tokenizer."""
    from linfusion_cli.errors import InputError
    from linfusion_cli.planning.request import Request, make_plan

    values = {"prompt": "x", "model": "demo", "res": 64, field: "bad\0name"}
    with pytest.raises(InputError, match="NUL byte"):
        make_plan(Request(**values))


def test_nul_byte_in_an_argument_is_one_line(cli, tmp_path):
    one_error(cli("generate", "x", *DEMO, "--res", "64", "-o", "a\0b/x.png"), 2, "NUL byte")
    assert files_under(tmp_path) == []
