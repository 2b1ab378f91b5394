"""The `linfusion` command line: every command and option family, in-process and as subprocesses.

All generation uses `--model demo` at 64..128 px with 2 steps, so each image takes seconds on a CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from linfusion_cli.io.metadata import read_metadata

from ..cli_helpers import (
    Result,
    files_under,
    parameters_fields,
    pixels,
    write_preset,
)


DEMO = ("--model", "demo", "--steps", "2")
RESULT_KEYS = {"path", "seed", "width", "height", "model", "linfusion", "stages"}
STAGE_KEYS = {"width", "height", "strength", "seconds", "peak_gib"}


def one_json(result: Result) -> dict:
    assert result.code == 0, result.err
    lines = result.out_lines
    assert len(lines) == 1, result.out
    return json.loads(lines[0])


# ---------------------------------------------------------------- generate


def test_generate_sampling_options_reach_json_and_metadata(cli, tmp_path):
    r = cli("generate", "a lighthouse at dusk", *DEMO, "--res", "128", "--aspect", "2:1", "--seed", "7",
            "--guidance", "3.5", "--negative", "blurry, dull", "--scheduler", "euler",
            "--device", "cpu", "--dtype", "fp32", "--json", "-o", "out/")
    data = one_json(r)
    assert RESULT_KEYS <= data.keys()
    assert (data["seed"], data["width"], data["height"], data["model"]) == (7, 128, 64, "demo")
    assert data["linfusion"] == "fresh"
    assert len(data["stages"]) == 1 and STAGE_KEYS <= data["stages"][0].keys()
    assert data["stages"][0]["strength"] is None and data["stages"][0]["width"] == 128
    path = tmp_path / data["path"]
    assert path.is_file() and path.parent == tmp_path / "out"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (128, 64)

    meta = read_metadata(path)
    record = meta["record"]
    assert (record["seed"], record["width"], record["height"]) == (7, 128, 64)
    assert record["negative"] == "blurry, dull" and record["prompt"] == "a lighthouse at dusk"
    assert record["guidance"] == 3.5 and record["steps"] == 2
    assert record["device"] == "cpu" and record["dtype"] == "fp32"
    params = meta["parameters"]
    assert params.splitlines()[0] == "a lighthouse at dusk"
    assert params.splitlines()[1] == "Negative prompt: blurry, dull"
    fields = parameters_fields(params)
    assert fields["Sampler"] == "Euler"
    assert fields["Seed"] == "7" and fields["Steps"] == "2" and fields["CFG scale"] == "3.5"
    assert fields["Size"] == "128x64" and fields["Model"] == "demo"


def test_seed_determinism_output_file_and_overwrite(cli, tmp_path):
    args = ("generate", "a red boat", *DEMO, "--res", "64", "-q")
    assert cli(*args, "--seed", "3", "-o", "a.png").code == 0
    r = cli(*args, "--seed", "3", "-o", "b.png")
    assert r.code == 0 and r.out.strip() == "b.png" and r.err == ""
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))

    refused = cli(*args, "--seed", "4", "-o", "a.png")
    assert refused.code == 2 and "--overwrite" in refused.err
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    assert cli(*args, "--seed", "4", "-o", "a.png", "--overwrite").code == 0
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    assert read_metadata(tmp_path / "a.png")["record"]["seed"] == 4
    assert sorted(p.name for p in files_under(tmp_path) if "config" not in p.parts) == ["a.png", "b.png"]


@pytest.mark.parametrize("how", ["--format", "suffix"])
def test_width_height_and_formats(cli, tmp_path, how):
    if how == "--format":
        out, fmt, pil = ("-o", "out/", "--format", "jpg"), "jpg", "JPEG"
    else:
        out, fmt, pil = ("-o", "out/pic.tiff"), "tiff", "TIFF"
    data = one_json(cli("generate", "a castle", *DEMO, "--width", "128", "--height", "64", "--seed", "2",
                        "--json", *out))
    path = tmp_path / data["path"]
    assert path.suffix == f".{fmt}" and (data["width"], data["height"]) == (128, 64)
    with Image.open(path) as im:
        assert im.format == pil and im.size == (128, 64)
    meta = read_metadata(path)
    assert meta["record"]["seed"] == 2 and meta["record"]["width"] == 128
    assert parameters_fields(meta["parameters"])["Size"] == "128x64"


def test_user_preset_file_strengths_vae_tile_save_stages_verbose(cli, tmp_path):
    preset = write_preset(tmp_path / "tiny.yaml")
    r = cli("generate", "a forest", "--preset", str(preset), "--res", "128", "--strengths", "0.5",
            "--vae-tile", "64", "--seed", "5", "--save-stages", "--json", "-v", "-o", "out/final.png")
    data = one_json(r)
    assert [(s["width"], s["height"], s["strength"]) for s in data["stages"]] == [(64, 64, None),
                                                                                 (128, 128, 0.5)]
    assert data["stages"][1]["steps"] == 1  # 2 nominal steps x 0.5
    assert "stage 1/2" in r.err and "stage 2/2" in r.err  # -v logs each stage on a pipe
    final = tmp_path / "out" / "final.png"
    stage1 = tmp_path / "out" / "final.png.stage1-64x64.png"
    assert final.is_file() and stage1.is_file()
    with Image.open(stage1) as im:
        assert im.size == (64, 64)
    record = read_metadata(final)["record"]
    assert record["stages"][1]["memory"]["vae_tile_px"] == 64
    assert record["stages"][1]["strength"] == 0.5
    assert parameters_fields(read_metadata(final)["parameters"])["LinFusion stages"] == "64x64;128x128@0.5"


def test_no_linfusion(cli, tmp_path):
    plan = one_json(cli("generate", "a boat", *DEMO, "--res", "64", "--no-linfusion", "--dry-run", "--json"))
    assert plan["linfusion"] is None
    data = one_json(cli("generate", "a boat", *DEMO, "--res", "64", "--no-linfusion", "--json", "-o", "x.png"))
    assert data["linfusion"] is None
    assert read_metadata(tmp_path / "x.png")["record"]["linfusion"] is None


# ---------------------------------------------------------------- dry run


def test_dry_run_text_and_json_load_nothing(cli, tmp_path, monkeypatch):
    from linfusion_cli.models import loading

    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run loaded a model")

    monkeypatch.setattr(loading, "load_model", refuse)
    model = "nobody-knows/this-model-does-not-exist"
    r = cli("generate", "a lighthouse", "--model", model, "--res", "4096", "--aspect", "2:1",
            "--max-vram", "80", "--seed", "11", "--dry-run")
    assert r.code == 0, r.err
    assert model in r.out and "seed 11" in r.out
    assert "stage 1: 1024x512 text-to-image" in r.out and "stage 3: 4096x2048 img2img @0.3" in r.out

    plan = one_json(cli("generate", "a lighthouse", "--model", model, "--res", "4096", "--aspect", "2:1",
                        "--max-vram", "80", "--seed", "11", "--dry-run", "--json", "--steps", "10"))
    assert plan["model"] == model and plan["seed"] == 11 and plan["prompt"] == "a lighthouse"
    stages = plan["stages"]
    assert [(s["width"], s["height"], s["strength"]) for s in stages] == [
        (1024, 512, None), (2048, 1024, 0.4), (4096, 2048, 0.3)]
    assert [s["steps"] for s in stages] == [10, 10, 10]
    assert [s["denoise_steps"] for s in stages] == [10, 4, 3]
    assert [s["seed"] for s in stages] == [11, 12, 13]
    for s in stages:
        assert s["memory"]["estimated_peak_gib"] > 0
    assert files_under(tmp_path) == [], "a dry run writes nothing"


def test_dry_run_user_preset_from_config_dir_and_presets_commands(cli, tmp_path):
    config = tmp_path / "config"
    write_preset(config / "presets" / "tiny.yaml")
    listed = cli("presets", "list")
    assert listed.code == 0
    line = next(line for line in listed.out_lines if line.startswith("tiny "))
    assert "tiny test ladder" in line and str(config / "presets" / "tiny.yaml") in line
    assert any(line.startswith("sd15 ") for line in listed.out_lines)

    shown = cli("presets", "show", "tiny")
    assert shown.code == 0 and "native: 64" in shown.out
    bundled = cli("presets", "show", "sdxl")
    assert bundled.code == 0 and "family: sdxl" in bundled.out
    where = cli("presets", "path")
    assert where.code == 0 and where.out.strip() == str(config / "presets")

    plan = one_json(cli("generate", "x", "--preset", "tiny", "--res", "256", "--dry-run", "--json"))
    assert plan["model"] == "demo" and plan["extras"]["preset"] == "tiny"
    assert [(s["width"], s["strength"]) for s in plan["stages"]] == [(64, None), (128, 0.5), (256, 0.5)]


def test_prompt_from_stdin(cli):
    plan = one_json(cli("generate", "-", *DEMO, "--res", "64", "--dry-run", "--json", stdin="a dragon\n"))
    assert plan["prompt"] == "a dragon"
    plan = one_json(cli("generate", *DEMO, "--res", "64", "--dry-run", "--json", stdin="piped prompt"))
    assert plan["prompt"] == "piped prompt"
    empty = cli("generate", "-", *DEMO, "--res", "64", "--dry-run", stdin="  \n")
    assert empty.code == 2 and len(empty.err_lines) == 1 and "no prompt" in empty.err


# ---------------------------------------------------------------- upscale


def test_upscale_keeps_aspect_and_records_input(cli, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    dry = one_json(cli("upscale", "in.png", "a field", "--model", "demo", "--res", "128", "--steps", "10",
                       "--dry-run", "--json"))
    assert (dry["width"], dry["height"]) == (128, 64)
    assert all(s["strength"] is not None for s in dry["stages"])  # no text-to-image base
    data = one_json(cli("upscale", "in.png", "a field", *DEMO, "--res", "128", "--strengths", "0.5",
                        "--seed", "1", "--json", "-o", "up.jpg"))
    assert (data["width"], data["height"]) == (128, 64) and data["path"] == "up.jpg"
    with Image.open(tmp_path / "up.jpg") as im:
        assert im.format == "JPEG" and im.size == (128, 64)
    record = read_metadata(tmp_path / "up.jpg")["record"]
    assert record["init_image"] == "in.png" and record["prompt"] == "a field"


# ---------------------------------------------------------------- batch


def test_batch_jsonl_a1111_and_plain_lines(cli, tmp_path):
    (tmp_path / "prompts.txt").write_text(
        "# comment, then a blank line\n\n"
        '{"prompt": "a cat", "seed": 5, "width": 128, "height": 64, "negative": "dull"}\n'
        '--prompt "a dog, red" --negative_prompt "ugly" --seed 9 --steps 3 --cfg_scale 4 --width 64 --height 64\n'
        "a plain bird\n")
    r = cli("batch", "prompts.txt", *DEMO, "--res", "64", "--seed", "100", "--json", "-o", "out", "-q")
    assert r.code == 0, r.err
    rows = [json.loads(line) for line in r.out_lines]
    assert [row["prompt"] for row in rows] == ["a cat", "a dog, red", "a plain bird"]
    want = [(5, 128, 64, "dull", 2, 7.5), (9, 64, 64, "ugly", 3, 4.0), (102, 64, 64, "", 2, 7.5)]
    for row, (seed, w, h, negative, steps, guidance) in zip(rows, want):
        assert (row["seed"], row["width"], row["height"]) == (seed, w, h)
        record = read_metadata(tmp_path / row["path"])["record"]
        assert (record["seed"], record["width"], record["height"], record["prompt"]) == (
            seed, w, h, row["prompt"])
        assert (record["negative"], record["steps"], record["guidance"]) == (negative, steps, guidance)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "0000-a-cat.png", "0001-a-dog-red.png", "0002-a-plain-bird.png", "linfusion-manifest.jsonl"]


def test_batch_resume_skips_identical_and_overwrite_regenerates(cli, tmp_path, monkeypatch):
    from linfusion_cli import api

    args = ("batch", "-", *DEMO, "--res", "64", "--seed", "1", "--json", "-o", "out/", "-q")
    first = cli(*args, stdin="one\ntwo\n")
    assert first.code == 0, first.err
    paths = [tmp_path / json.loads(line)["path"] for line in first.out_lines]
    stamps = [(p.stat().st_mtime_ns, p.read_bytes()) for p in paths]

    real = api.generate_file

    def must_not_run(*a, **k):
        raise AssertionError("--resume regenerated an identical image")

    monkeypatch.setattr(api, "generate_file", must_not_run)
    again = cli(*args, "--resume", stdin="one\ntwo\n")
    assert again.code == 0, again.err
    assert [json.loads(line) for line in again.out_lines] == [
        {"path": str(p.relative_to(tmp_path)), "index": i, "skipped": True} for i, p in enumerate(paths)]
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in paths] == stamps
    events = cli(*args[:-1], "--resume", "--progress", "json", stdin="one\ntwo\n")  # the same lines
    assert events.out_lines == again.out_lines, events.out  # (a done entry was once "by another process")
    assert [json.loads(line)["reason"] for line in events.err_lines if '"skip"' in line] == ["done", "done"]

    # different parameters: refused even with --resume, regenerated with --overwrite
    changed = cli(*args, "--steps", "3", "--resume", stdin="one\ntwo\n")
    assert changed.code == 2 and len(changed.err_lines) == 1 and "--overwrite" in changed.err
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in paths] == stamps
    monkeypatch.setattr(api, "generate_file", real)
    redone = cli(*args, "--steps", "3", "--resume", "--overwrite", stdin="one\ntwo\n")
    assert redone.code == 0, redone.err
    assert all(not json.loads(line).get("skipped") for line in redone.out_lines)
    assert [read_metadata(p)["record"]["steps"] for p in paths] == [3, 3]
    assert sorted(files_under(tmp_path / "out")) == sorted([*paths, tmp_path / "out" / "linfusion-manifest.jsonl"])


# ---------------------------------------------------------------- info, help


def test_info_text_and_json(cli, cli_cache):
    data = one_json(cli("info", "--json"))
    assert {"versions", "devices", "caches"} <= data.keys()
    assert data["versions"]["torch"] and data["devices"][0]["device"] == "cpu"
    assert data["caches"]["linfusion_cache"] == str(cli_cache)
    text = cli("info")
    assert text.code == 0 and "versions: python" in text.out and "device cpu:" in text.out


# ---------------------------------------------------------------- subprocesses
