"""--preview and --progress json through the CLI: previews rewritten atomically during every stage,
each method, the size cap, JSON events on stderr and nothing else, the same image with and
without them, batch names, and bad paths and TAESD folders refused before the model loads.

All runs use `--model demo` (or a dry run) with a 64 px base preset and a few steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from linfusion_cli.pipeline import PhaseProgress, PreviewWritten

from ..cli_helpers import json_lines, pixels, run_subprocess, tiny_preset
from ..model_helpers import save_taesd


MARK = "linfusion-preview"


def _watch(monkeypatch, on_event):
    """Hand every pipeline event of the CLI's runs to on_event (before the CLI's own view)."""
    from linfusion_cli.cli import runs

    real = runs.progress_view

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, event):
            on_event(event)
            self.inner(event)

    monkeypatch.setattr(runs, "progress_view", lambda *a, **kw: Spy(real(*a, **kw)))


def _complete_png(path: Path) -> tuple[int, int]:
    """The file is a whole PNG (every chunk's CRC, IEND) carrying the preview marker; its size."""
    with open(path, "rb") as fh:
        data = fh.read()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        im.load()
        assert im.info.get(MARK) == "1"
        return im.size


# ---------------------------------------------------------------- during the run, atomically


def test_preview_is_rewritten_atomically_during_every_stage(cli, tmp_path, monkeypatch):
    """After every step (--preview-every 1) and at each stage's end; at every step event the
    path holds a whole PNG; every write went through a temporary file beside it and os.replace.
    A preview left by an earlier run is replaced without --overwrite."""
    from linfusion_cli.io import previews

    live = tmp_path / "live.png"
    previews.write(Image.new("RGB", (8, 8)), live)  # an earlier run's preview
    replaced, seen = [], []
    real_replace = os.replace

    def replace(src, dst):
        replaced.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    def check(event):
        if isinstance(event, PhaseProgress) and event.phase == "denoise":
            _complete_png(live)
        if isinstance(event, PreviewWritten):
            seen.append((event.stage, event.step, event.method, _complete_png(live)))

    monkeypatch.setattr(os, "replace", replace)
    _watch(monkeypatch, check)
    r = cli("generate", "a boat", *tiny_preset(tmp_path), "--res", "128", "--steps", "4", "--seed", "3",
            "-o", "out/a.png", "--preview", "live.png", "--preview-every", "1",
            "--preview-method", "latent2rgb")
    assert r.code == 0, r.err
    assert [(stage, step) for stage, step, _, _ in seen] == \
        [(0, 1), (0, 2), (0, 3), (0, 4), (0, None), (1, 1), (1, 2), (1, None)]
    assert {size for stage, _, _, size in seen} == {(64, 64), (128, 128)}
    assert [m for _, step, m, _ in seen if step is not None] == ["latent2rgb"] * 6
    mine = [(src, dst) for src, dst in replaced if dst.name == "live.png"]
    assert len(mine) == len(seen)
    assert all(src.parent == dst.parent and src.name.startswith(".live.png.") and
               src.name.endswith(".part") and not src.exists() for src, dst in mine)
    assert not [p for p in tmp_path.rglob("*.part")]
    final = pixels(tmp_path / "out" / "a.png")
    thumb = np.asarray(Image.open(live).convert("RGB"))
    assert thumb.shape == final.shape and np.array_equal(thumb, final)  # the last: the finished image


# ---------------------------------------------------------------- JSON progress; nothing changes


@pytest.mark.slow
def test_json_progress_is_all_of_stderr_and_the_image_is_unchanged(cli, cli_env, tmp_path):
    """A real process with -v: every stderr line is one JSON object (libraries' notices too),
    every stage and step is there in order, stdout is the path; the pixels equal a plain run's."""
    args = ["generate", "a boat", *tiny_preset(tmp_path), "--res", "128", "--steps", "4", "--seed", "5"]
    plain = cli(*args, "-o", "plain.png")
    assert plain.code == 0, plain.err
    proc = run_subprocess(["linfusion", *args, "-o", "watched.png", "--preview", "live.png",
                           "--preview-every", "1", "--progress", "json", "-v"], cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout == b"watched.png\n"
    events = json_lines(proc.stderr.decode())
    assert all(isinstance(e.get("time"), float) for e in events)
    kinds = [e["event"] for e in events if e["event"] != "log"]
    assert kinds[:3] == ["load_start", "load_end", "run_start"] and kinds[-1] == "run_end"
    start = next(e for e in events if e["event"] == "run_start")
    assert [(s["stage"], s["steps"]) for s in start["stages"]] == [(1, 4), (2, 2)]
    assert start["preview"]["path"] == "live.png" and start["preview"]["method"] == "taesd"
    for stage, steps in ((1, 4), (2, 2)):
        mine = [e for e in events if e.get("stage") == stage]
        assert mine[0]["event"] == "stage_start" and mine[-1]["event"] == "stage_end"
        assert [e["step"] for e in mine if e["event"] == "step"] == list(range(1, steps + 1))
        assert all(e["steps"] == steps and e["stages"] == 2 and e["eta_s"] >= 0 and e["elapsed_s"] >= 0
                   for e in mine if e["event"] == "step")
        previews = [e for e in mine if e["event"] == "preview"]
        assert [e["step"] for e in previews] == list(range(1, steps + 1)) + [None]
        assert all(e["path"] == "live.png" and e["seconds"] >= 0 for e in previews)
    end = events[-1]
    assert end["event"] == "run_end" and end["ok"] is True and end["path"] == "watched.png"
    assert np.array_equal(pixels(tmp_path / "watched.png"), pixels(tmp_path / "plain.png"))


@pytest.mark.parametrize("extra", [("--scheduler", "euler_a", "--preview-method", "taesd"),
                                   ("--method", "demofusion", "--preview-method", "latent2rgb")])
def test_previews_change_no_pixel(cli, tmp_path, extra):
    """A scheduler that draws noise at every step, and DemoFusion's two passes per step."""
    args = ["generate", "a boat", *tiny_preset(tmp_path), "--res", "128", "--steps", "4", "--seed", "9",
            *extra[:2]]
    assert cli(*args, "-o", "a.png").code == 0
    r = cli(*args, "-o", "b.png", "--preview", "p.png", "--preview-every", "1", *extra[2:],
            "--progress", "json")
    assert r.code == 0, r.err
    assert sum(e["event"] == "preview" for e in json_lines(r.err)) == 4 + 2 + 2
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))


# ---------------------------------------------------------------- methods and the size cap


@pytest.mark.parametrize("method,folder,expect", [("latent2rgb", False, "latent2rgb"),
                                                  ("auto", False, "taesd"),
                                                  ("taesd", True, "taesd")])
def test_each_method_under_the_size_cap(cli, tmp_path, method, folder, expect):
    """A 128x64 stage at --preview-size 64 gives 64x32 previews by every method; auto takes the
    demo's TAESD; --preview-taesd DIR loads a saved AutoencoderTiny the way a download loads."""
    taesd = ("--preview-taesd", str(save_taesd(tmp_path / "taesd"))) if folder else ()
    r = cli("generate", "a boat", *tiny_preset(tmp_path), "--width", "128", "--height", "64", "--steps", "2",
            "--seed", "1", "-o", "a.png", "--preview", "p.png", "--preview-size", "64",
            "--preview-method", method, *taesd, "--progress", "json")
    assert r.code == 0, r.err
    events = json_lines(r.err)
    plan = next(e for e in events if e["event"] == "run_start")["preview"]
    assert plan["method"] == expect and plan["asked"] == method
    if folder:
        assert plan["taesd"]["folder"] == str(tmp_path / "taesd")
    shown = [e for e in events if e["event"] == "preview"]
    assert [e["method"] for e in shown] == [expect, expect, "image"]
    assert {(e["width"], e["height"]) for e in shown} == {(64, 32)}
    assert _complete_png(tmp_path / "p.png") == (64, 32)


def _hub_cache(monkeypatch, tmp_path, repo="madebyollin/taesd") -> Path:
    """A Hugging Face cache holding `repo` as a download leaves it (refs/main -> a snapshot)."""
    from huggingface_hub import constants

    root = tmp_path / "hub"
    entry = root / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text("abc123")
    save_taesd(entry / "snapshots" / "abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return entry / "snapshots" / "abc123"


def test_auto_takes_a_cached_taesd_else_latent2rgb(cli, tmp_path, monkeypatch):
    """A real model (planned only): auto without madebyollin/taesd in the cache draws latent2rgb,
    with it TAESD; --preview-method taesd without it is refused in one line naming the download."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    args = ("generate", "a boat", "--res", "256", "--device", "cpu", "--max-vram", "32", "--dry-run",
            "--json", "-o", "a.png", "--preview", "p.png")
    r = cli(*args)
    assert r.code == 0, r.err
    preview = json.loads(r.out)["preview"]
    assert preview["method"] == "latent2rgb" and "madebyollin/taesd" in preview["why"]
    r = cli(*args, "--preview-method", "taesd")
    assert r.code == 2 and len(r.err_lines) == 1 and "download madebyollin/taesd" in r.err
    r = cli(*args, "--preview-taesd", "madebyollin/taesdxl")
    assert r.code == 2 and len(r.err_lines) == 1 and "madebyollin/taesd" in r.err
    snapshot = _hub_cache(monkeypatch, tmp_path)
    r = cli(*args)
    assert r.code == 0, r.err
    preview = json.loads(r.out)["preview"]
    assert preview["method"] == "taesd" and preview["taesd"]["folder"] == str(snapshot)


def test_dry_run_shows_the_preview_in_the_plan(cli, tmp_path):
    """The line and JSON field; the preview's bytes are in each stage's estimate and the knobs
    are those of the plan without a preview (so the image is too)."""
    args = ("generate", "a boat", "--model", "demo", "--res", "1024", "--seed", "1", "--dry-run", "-o", "a.png")
    without = json.loads(cli(*args, "--json").out)
    with_preview = json.loads(cli(*args, "--json", "--preview", "p.png").out)
    preview = with_preview["preview"]
    assert preview["method"] == "taesd" and preview["size"] == 1024 and preview["bytes"] > 0
    assert [(s["width"], s["every"]) for s in preview["stages"]] == [(512, 5), (1024, 2)]
    for plain, shown, own in zip(without["stages"], with_preview["stages"], preview["stages"]):
        knobs = {k: v for k, v in plain["memory"].items() if k != "estimated_peak_gib"}
        assert knobs == {k: v for k, v in shown["memory"].items() if k != "estimated_peak_gib"}
        grown = shown["memory"]["estimated_peak_gib"] - plain["memory"]["estimated_peak_gib"]
        assert abs(grown - own["bytes"] / 2 ** 30) <= 0.011
    text = cli(*args, "--preview", "p.png", "--preview-method", "latent2rgb", "--preview-every", "3").out
    assert "preview: p.png, latent2rgb, every 3 steps and at each stage's end, long side <= 1024 px" in text
    assert not (tmp_path / "p.png").exists()


# ---------------------------------------------------------------- batch


def test_batch_previews_are_named_per_entry_and_reported_as_json(cli, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red boat\na blue boat\n")
    r = cli("batch", str(prompts), "--model", "demo", "--steps", "2", "--res", "64", "--seed", "1",
            "-o", "out", "--preview", "live.png", "--progress", "json")
    assert r.code == 0, r.err
    assert _complete_png(tmp_path / "live-0000.png") == (64, 64)
    assert (tmp_path / "live-0001.png").is_file() and not (tmp_path / "live.png").exists()
    events = json_lines(r.err)
    kinds = [(e["event"], e.get("index")) for e in events if e["event"] in ("run_start", "run_end")]
    assert kinds == [("run_start", 0), ("run_end", 0), ("run_start", 1), ("run_end", 1)]
    assert events[0]["event"] == "batch_start" and events[0]["entries"] == 2
    assert events[-1] == {**events[-1], "event": "batch_end", "failures": 0}
    assert {e["path"] for e in events if e["event"] == "preview"} == {"live-0000.png", "live-0001.png"}
    r = cli("batch", str(prompts), "--model", "demo", "--steps", "2", "--res", "64", "--seed", "1",
            "-o", "out2", "--preview", "{name}.preview.png", "--dry-run", "--json")
    assert r.code == 0, r.err
    assert [json.loads(line)["preview"]["path"] for line in r.out_lines] == \
        ["0000-a-red-boat.preview.png", "0001-a-blue-boat.preview.png"]


# ---------------------------------------------------------------- refusals, before the model loads
