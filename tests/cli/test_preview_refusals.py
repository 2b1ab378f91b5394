"""--preview's refusals before the model loads (bad paths, bad TAESD folders), JSON-mode errors,
and a preview that fails stopping previews, never the run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from ..cli_helpers import json_lines, no_load, tiny_preset
from ..model_helpers import save_taesd


def _bad_path(kind: str, tmp_path, monkeypatch) -> tuple[str, ...]:
    if kind == "a directory":
        (tmp_path / "shots").mkdir()
        return ("--preview", "shots")
    if kind == "a missing parent":
        return ("--preview", "nowhere/live.png")
    if kind == "an unwritable folder":
        (tmp_path / "ro").mkdir()
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == Path("ro") else real(p, m))
        return ("--preview", "ro/live.png")
    if kind == "a file as its folder":
        (tmp_path / "afile").write_text("x")
        return ("--preview", "afile/live.png")
    if kind == "a symbolic link":
        (tmp_path / "live.png").symlink_to(tmp_path / "elsewhere.png")
        return ("--preview", "live.png")
    if kind == "another image":
        Image.new("RGB", (8, 8)).save(tmp_path / "live.png")
        return ("--preview", "live.png")
    if kind == "the output":
        return ("--preview", "a.png")
    if kind == "no image suffix":
        return ("--preview", "live.txt")
    if kind == "no --preview":
        return ("--preview-every", "2")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["a directory", "a missing parent", "an unwritable folder",
                                  "a file as its folder", "a symbolic link", "another image", "the output",
                                  "no image suffix", "no --preview"])
def test_bad_preview_paths_are_refused_before_loading(cli, tmp_path, monkeypatch, kind):
    flags = _bad_path(kind, tmp_path, monkeypatch)
    no_load(monkeypatch)
    r = cli("generate", "a boat", "--model", "demo", "--res", "64", "--steps", "2", "-o", "a.png", *flags)
    assert r.code == 2 and len(r.err_lines) == 1 and r.err.startswith("error:"), r.err
    assert r.out == "" and not (tmp_path / "a.png").exists()


def _bad_taesd(kind: str, tmp_path) -> str:
    folder = save_taesd(tmp_path / "taesd")
    weights = folder / "diffusion_pytorch_model.safetensors"
    config = folder / "config.json"
    if kind == "no weights":
        weights.unlink()
    elif kind == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif kind == "not a TAESD":
        config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "AutoencoderKL"}))
    elif kind == "other shapes":
        config.write_text(json.dumps({**json.loads(config.read_text()), "decoder_block_out_channels": [16] * 4}))
    elif kind == "16 latent channels":
        save_taesd(tmp_path / "taesd16", latent_channels=16)
        return str(tmp_path / "taesd16")
    elif kind == "a file":
        return str(weights)
    elif kind == "missing":
        return str(tmp_path / "nothing-here")
    return str(folder)


@pytest.mark.parametrize("kind", ["no weights", "truncated weights", "not a TAESD", "other shapes",
                                  "16 latent channels", "a file", "missing"])
def test_bad_taesd_folders_are_refused_before_loading(cli, tmp_path, monkeypatch, kind):
    source = _bad_taesd(kind, tmp_path)
    no_load(monkeypatch)
    r = cli("generate", "a boat", "--model", "demo", "--res", "64", "--steps", "2", "-o", "a.png",
            "--preview", "p.png", "--preview-taesd", source)
    assert r.code == 2 and len(r.err_lines) == 1, r.err
    assert "--preview-taesd" in r.err or "TAESD" in r.err


def test_json_mode_errors_are_json_lines(cli, tmp_path, monkeypatch):
    no_load(monkeypatch)
    r = cli("generate", "a boat", "--model", "demo", "--steps", "abc", "--progress", "json")
    assert r.code == 2 and [e["event"] for e in json_lines(r.err)] == ["error"]
    r = cli("generate", "a boat", "--model", "demo", "--res", "64", "--progress", "json", "--preview", "nowhere/p.png")
    events = json_lines(r.err)
    assert r.code == 2 and len(events) == 1 and "folder nowhere does not exist" in events[0]["message"]


def test_a_failing_preview_stops_previews_not_the_run(cli, tmp_path, monkeypatch):
    from linfusion_cli.errors import WriteError
    from linfusion_cli.io import previews

    calls = []

    def full(image, path):
        calls.append(path)
        raise WriteError(f"cannot write the preview {path}: No space left on device")

    monkeypatch.setattr(previews, "write", full)
    r = cli("generate", "a boat", *tiny_preset(tmp_path), "--res", "128", "--steps", "4", "--seed", "3",
            "-o", "a.png", "--preview", "p.png", "--preview-every", "1", "--progress", "json")
    assert r.code == 0, r.err
    events = json_lines(r.err)
    assert [e["event"] for e in events].count("preview_error") == 1 and len(calls) == 1
    assert events[-1]["event"] == "run_end" and events[-1]["ok"] is True
    assert (tmp_path / "a.png").is_file()
