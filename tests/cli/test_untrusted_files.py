"""Files a user points at: only regular files are opened, small files cannot ask for huge work,
broken presets, model folders and LinFusion configs are one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from linfusion_cli.io.manifest import MANIFEST_NAME

from ..cli_helpers import (
    DEMO, ip_adapter_case, make_dir, no_load, one_error, write_bytes, write_jsonl, write_preset,
)


@pytest.fixture(autouse=True)
def _no_hang():
    """A check that blocks (a FIFO opened) fails the test instead of hanging it."""
    def expire(signum, frame):
        raise TimeoutError("blocked")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(240)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _model_with_fifo_config(t: Path) -> Path:
    (t / "m").mkdir()
    (t / "m" / "model_index.json").write_text("{}")
    _fifo(t / "m" / "unet" / "config.json")
    return t / "m"


BLOCKING = {
    "lora": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--lora", str(_fifo(t / "l.safetensors"))], "FIFO"),
    "ip-adapter": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--ip-adapter",
                              str(_fifo(t / "ip.safetensors")), "--ip-image", str(t / "i.png")], "FIFO"),
    "control-image": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--controlnet", "o/cn",
                                 "--control-image", str(_fifo(t / "c.png"))], "FIFO"),
    "preset": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--preset", str(_fifo(t / "p.yaml"))], "FIFO"),
    "user-preset": (lambda t: [_fifo(t / "config" / "presets" / "mine.yaml") and "generate", "x", *DEMO,
                               "--res", "64", "--preset", "mine"], "FIFO"),
    "manifest": (lambda t: [_fifo(t / "out" / MANIFEST_NAME) and "batch",
                            str(write_jsonl(t / "p.jsonl", {"prompt": "a"})), *DEMO, "--res", "64", "-o",
                            str(t / "out"), "--resume"], "FIFO"),
    "model-file": (lambda t: ["generate", "x", "--model", str(_fifo(t / "m.safetensors")), "--res", "64"],
                   "FIFO"),
    "config-file": (lambda t: ["generate", "x", "--model", str(_model_with_fifo_config(t)), "--res", "64"],
                    "FIFO"),
    "init-image": (lambda t: ["upscale", str(_fifo(t / "in.png")), "x", *DEMO, "--res", "128"], "FIFO"),
}


@pytest.mark.parametrize("case", list(BLOCKING))
def test_fifos_and_devices_are_refused_before_opening(cli, tmp_path, monkeypatch, case):
    no_load(monkeypatch)
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "i.png")
    setup, needle = BLOCKING[case]
    result = cli(*setup(tmp_path), "--dry-run")
    one_error(result, needle)


def test_devices_are_refused_too(cli, monkeypatch):
    no_load(monkeypatch)
    one_error(cli("generate", "x", *DEMO, "--res", "64", "--preset", "/dev/zero", "--dry-run"), "character device")


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)) + \
    "lora: *i\n"


def _controlnet_case(t: Path) -> list[str]:
    (t / "cn").mkdir()
    (t / "cn" / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel",
                                                      "layers_per_block": 200000}))
    return ["--controlnet", str(t / "cn"), "--control-image", str(t / "i.png")]


HUGE = {
    "yaml-billion-laughs": (lambda t: ["--preset", str(write_preset(t / "p.yaml", LAUGHS))], "expands to over"),
    "yaml-deep-nesting": (lambda t: ["--preset", str(write_preset(t / "p.yaml", "negative: " + "[" * 50000
                                                                   + "]" * 50000 + "\n"))], "nested more than"),
    "controlnet-config": (_controlnet_case, "layers_per_block"),
    "encoder-config": (ip_adapter_case, "num_hidden_layers"),
}


@pytest.mark.parametrize("case", list(HUGE))
def test_small_inputs_cannot_ask_for_huge_work(cli, tmp_path, monkeypatch, case):
    no_load(monkeypatch)
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "i.png")
    setup, needle = HUGE[case]
    line = one_error(cli("generate", "x", *DEMO, "--res", "64", *setup(tmp_path), "--dry-run"), needle)
    assert len(line) < 400, "the message never shows an expanded value"
    if case.startswith("yaml"):  # the same file among the user presets does not break the listing
        write_preset(tmp_path / "config" / "presets" / "bomb.yaml", (tmp_path / "p.yaml").read_text())
        listing = cli("presets", "list")
        assert listing.code == 0 and "bomb" in listing.out and "unusable" in listing.out


def test_broken_user_presets_do_not_break_presets_list(cli, tmp_path):
    presets = tmp_path / "config" / "presets"
    write_bytes(presets / "binary.yaml", b"\xff\xfe\x00")
    make_dir(presets / "folder.yaml")
    write_preset(presets / "mine.yaml", "description: my own\nmodel: demo\n")
    result = cli("presets", "list")
    assert result.code == 0, result.err
    names = {line.split()[0]: line for line in result.out_lines}
    assert "my own" in names["mine"]
    assert "unusable" in names["binary"]
    assert "sd15" in names


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
    line = one_error(result, "local model folder", "broken")
    assert "huggingface-cli" not in line and "download" not in line


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
