"""--method on the command line: the dry run shows it, bad values stop early, the SD-XL demo runs."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from linfusion_cli.io.metadata import read_metadata

from ..cli_helpers import write_preset



def test_dry_run_shows_the_method_and_its_memory(cli):
    args = ("generate", "a lighthouse", "--model", "demo-sdxl", "--preset", "sd15", "--res", "2048",
            "--steps", "10", "--max-vram", "8", "--dry-run")
    r = cli(*args, "--method", "demofusion")
    assert r.code == 0, r.err
    assert "stage 2: 2048x2048 img2img @0.4 demofusion (dilation x8, cosine 3/1/1, sigma 1)" in r.out
    plan = json.loads(cli(*args, "--method", "demofusion", "--json").out)
    stage = plan["stages"][1]
    assert stage["method"] == "demofusion" and stage["denoise_steps"] == 4
    assert stage["demofusion"] == {"cosine_scale_1": 3.0, "cosine_scale_2": 1.0, "cosine_scale_3": 1.0,
                                   "gaussian_sigma": 1.0, "dilation": 8}
    sdedit = json.loads(cli(*args, "--method", "sdedit", "--json").out)["stages"][1]
    assert sdedit["method"] == "sdedit" and sdedit["demofusion"] is None
    assert stage["memory"]["estimated_peak_gib"] >= sdedit["memory"]["estimated_peak_gib"]
    assert "img2img @0.4 sdedit" in cli(*args).out  # the sd15 preset keeps SDEdit


def test_sdxl_preset_defaults_to_demofusion_and_presets_set_the_numbers(cli, tmp_path):
    r = cli("generate", "x", "--preset", "sdxl", "--res", "4096", "--max-vram", "80", "--dry-run")
    assert r.code == 0, r.err
    assert "stage 2: 2048x2048 img2img @0.32 demofusion (dilation x2, cosine 3/1/1, sigma 0.8), 16 steps" in r.out
    assert "stage 3: 4096x4096 img2img @0.24 demofusion (dilation x4" in r.out
    preset = write_preset(tmp_path / "p.yaml", "model: demo\nnative: 64\nmethod: demofusion\n"
                          "cosine_scale_1: 2\ngaussian_sigma: 0.5\nstrengths: [0.5]\n")
    r = cli("generate", "x", "--preset", str(preset), "--res", "128", "--steps", "4", "--dry-run")
    assert "demofusion (dilation x1, cosine 2/1/1, sigma 0.5)" in r.out, r.err


def test_bad_method_stops_before_loading(cli, tmp_path):
    r = cli("generate", "x", "--model", "demo", "--method", "tiles", "--dry-run")
    assert r.code == 2 and r.err_lines == ["error: unknown method 'tiles'; use sdedit or demofusion"]
    preset = write_preset(tmp_path / "bad.yaml", "method: demofusion\ncosine_scale_3: -2\n")
    r = cli("generate", "x", "--preset", str(preset), "--dry-run")
    assert r.code == 2 and len(r.err_lines) == 1 and "cosine_scale_3" in r.err


def test_upscale_with_demofusion_on_the_sdxl_demo(cli, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    r = cli("upscale", "in.png", "a red fox", "--model", "demo-sdxl", "--method", "demofusion",
            "--width", "512", "--height", "512", "--steps", "10", "--scheduler", "euler",
            "--strengths", "0.32", "--seed", "3", "-o", "out.png")
    assert r.code == 0, r.err
    assert r.out_lines == ["out.png"]
    with Image.open(tmp_path / "out.png") as im:
        assert im.size == (512, 512)
    stage = read_metadata(tmp_path / "out.png")["record"]["stages"][0]
    assert stage["method"] == "demofusion" and stage["demofusion"]["dilation"] == 2
    assert stage["denoise_steps"] == 4 and stage["scheduler"] == "euler"
