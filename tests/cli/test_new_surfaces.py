"""Hostile and careless input on the newer surfaces (adapters, presets, the manifest, launchers).

One test (or one parametrized table) per class of issue 23, "The new surfaces".
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from linfusion_cli.io.manifest import MANIFEST_NAME, Manifest

from ..cli_helpers import files_under, run_subprocess, write_preset
from .test_hostile_input import no_load, one_error

DEMO = ("--model", "demo", "--steps", "2")
LADDER = "description: two stages\nmodel: demo\nnative: 64\nsteps: 2\nstrengths: [0.5]\n"


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


def _jsonl(path: Path, *rows: dict) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- 1. every written path, in the preflight


def _out_with(tmp: Path, kind: str) -> Path:
    out = tmp / "out"
    out.mkdir()
    manifest = out / MANIFEST_NAME
    if kind == "manifest-symlink":
        (tmp / "elsewhere.jsonl").write_text("")
        manifest.symlink_to(tmp / "elsewhere.jsonl")
    elif kind == "manifest-dangling":
        manifest.symlink_to(tmp / "created-outside.jsonl")
    elif kind == "manifest-folder":
        manifest.mkdir()
    elif kind == "manifest-fifo":
        os.mkfifo(manifest)
    return out


WRITTEN = {
    "manifest-symlink": ('{"prompt": "a"}', (), "symbolic link"),
    "manifest-dangling": ('{"prompt": "a"}', (), "dangling"),
    "manifest-folder": ('{"prompt": "a"}', (), "a directory"),
    "manifest-fifo": ('{"prompt": "a"}', (), "a FIFO"),
    "entry-named-like-manifest": ('{"prompt": "a", "output": "linfusion-manifest.jsonl"}', ("--format", "png"),
                                  "is also the batch manifest"),
    "stage-file-is-another-output": ('{"prompt": "a", "output": "a.png"}\n'
                                     '{"prompt": "b", "output": "a.png.stage1-64x64.png"}',
                                     ("--save-stages",), "is also line 1"),
}


@pytest.mark.parametrize("resume", [False, True], ids=["plain", "resume"])
@pytest.mark.parametrize("case", list(WRITTEN))
def test_every_written_path_is_checked_before_anything_runs(cli, tmp_path, monkeypatch, case, resume):
    no_load(monkeypatch)
    lines, extra, needle = WRITTEN[case]
    out = _out_with(tmp_path, case)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(lines + "\n")
    preset = write_preset(tmp_path / "ladder.yaml", LADDER)
    before = files_under(tmp_path)
    result = cli("batch", str(prompts), "--preset", str(preset), "--res", "128", "-o", str(out), *extra,
                 *(["--resume"] if resume else []))
    one_error(result, 2, needle)
    assert files_under(tmp_path) == before
    assert not (tmp_path / "created-outside.jsonl").exists()


# ---------------------------------------------------------------- 2. concurrent runs on one folder


@pytest.mark.slow
def test_two_processes_on_one_folder_lose_no_image(cli_env, tmp_path):
    """A holds entry 0 (paused right after claiming it, by files); B runs whole meanwhile; then A
    goes on. Each image is made once, by one process, and recorded once; both exit 0."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    ready, go = tmp_path / "a-claimed", tmp_path / "a-go"
    args = [sys.executable, "-m", "linfusion_cli", "batch", str(prompts), *DEMO, "--res", "64", "--json",
            "-o", "out/", "--resume", "-q"]
    env_a = dict(cli_env, OMP_NUM_THREADS="1", LINFUSION_TEST_HOOKS="1",
                 LINFUSION_TEST_PAUSE_CLAIMED=f"0:{ready}:{go}")
    a = subprocess.Popen(args, env=env_a, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    try:
        while not ready.exists():  # A has claimed entry 0 and holds
            assert a.poll() is None, a.communicate()
            time.sleep(0.05)
        b = run_subprocess(args, dict(cli_env, OMP_NUM_THREADS="1"), cwd=tmp_path)
        assert b.returncode == 0, b.stderr.decode()
        b_rows = [json.loads(line) for line in b.stdout.decode().splitlines()]
        assert [r["index"] for r in b_rows] == [0, 1]
        assert b_rows[0].get("by") == "another process" and not b_rows[1].get("skipped")
    finally:
        go.touch()
        a_out, a_err = a.communicate(timeout=600)
    assert a.returncode == 0, a_err.decode()
    a_rows = [json.loads(line) for line in a_out.decode().splitlines()]
    assert not a_rows[0].get("skipped") and a_rows[1].get("by") == "another process"
    lines = (tmp_path / "out" / MANIFEST_NAME).read_text().splitlines()
    assert sorted(json.loads(line)["index"] for line in lines) == [0, 1], "each image recorded once"
    manifest = Manifest(tmp_path / "out").load()
    assert all(manifest.records[i].intact(manifest.folder) for i in (0, 1))
    assert manifest.records[0].seed == a_rows[0]["seed"] and manifest.records[1].seed == b_rows[1]["seed"]


# ---------------------------------------------------------------- 3. lines are '\n' lines


def test_prompt_files_and_manifest_split_on_newlines_only(cli, tmp_path):
    from linfusion_cli.io.prompts import parse_prompts, read_prompt_file

    text = "a\u2028b\n# note\u2029tail\nc\x0cd\u0085e\r\n\n"
    assert [e.prompt for e in parse_prompts(text, "f")] == ["a\u2028b", "c\x0cd\u0085e"]
    bom = read_prompt_file("-", stdin=io.StringIO('\ufeff{"prompt": "x", "seed": 3}\n'))
    assert [(e.prompt, e.seed) for e in bom] == [("x", 3)]
    args = ("batch", "-", *DEMO, "--res", "64", "--json", "-o", "out/", "-q")
    first = cli(*args, stdin="a\u2028b\n")  # no --seed: the record must survive for --resume
    assert first.code == 0, first.err
    again = cli(*args, "--resume", stdin="a\u2028b\n")
    assert again.code == 0, again.err
    assert [json.loads(line).get("skipped") for line in again.out_lines] == [True]


# ---------------------------------------------------------------- 4. nothing but regular files is opened


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
                            str(_jsonl(t / "p.jsonl", {"prompt": "a"})), *DEMO, "--res", "64", "-o",
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
    one_error(result, 2, needle)


def test_devices_are_refused_too(cli, monkeypatch):
    no_load(monkeypatch)
    one_error(cli("generate", "x", *DEMO, "--res", "64", "--preset", "/dev/zero", "--dry-run"), 2,
              "character device")


# ---------------------------------------------------------------- 5. small inputs, huge work


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)) + \
    "lora: *i\n"


def _encoder_case(t: Path) -> list[str]:
    from safetensors.torch import save_file

    from linfusion_cli.models.tiny import DEMO_UNET_CONFIGS

    cross = DEMO_UNET_CONFIGS["sd15"]["cross_attention_dim"]
    save_file({"image_proj.proj.weight": torch.zeros(4 * cross, 32),
               "ip_adapter.1.to_k_ip.weight": torch.zeros(8, cross)}, str(t / "ip.safetensors"))
    (t / "image_encoder").mkdir()
    (t / "image_encoder" / "config.json").write_text(json.dumps({"num_hidden_layers": 300000,
                                                                 "projection_dim": 32}))
    return ["--ip-adapter", str(t / "ip.safetensors"), "--ip-image", str(t / "i.png")]


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
    "encoder-config": (_encoder_case, "num_hidden_layers"),
}


@pytest.mark.parametrize("case", list(HUGE))
def test_small_inputs_cannot_ask_for_huge_work(cli, tmp_path, monkeypatch, case):
    no_load(monkeypatch)
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "i.png")
    setup, needle = HUGE[case]
    line = one_error(cli("generate", "x", *DEMO, "--res", "64", *setup(tmp_path), "--dry-run"), 2, needle)
    assert len(line) < 400, "the message never shows an expanded value"
    if case.startswith("yaml"):  # the same file among the user presets does not break the listing
        write_preset(tmp_path / "config" / "presets" / "bomb.yaml", (tmp_path / "p.yaml").read_text())
        listing = cli("presets", "list")
        assert listing.code == 0 and "bomb" in listing.out and "unusable" in listing.out


def test_batch_validation_decodes_a_shared_image_once_and_shows_progress(cli, tmp_path, monkeypatch):
    from PIL import Image

    from linfusion_cli.adapters import common
    from linfusion_cli.cli import batch
    from linfusion_cli.io import images

    Image.new("RGB", (64, 64)).save(tmp_path / "i.png")
    calls = []
    real = images.open_image
    monkeypatch.setattr(images, "open_image", lambda p: calls.append(p) or real(p))
    common._image_size.cache_clear()
    for _ in range(30):
        assert common.check_image(str(tmp_path / "i.png"), "--control-image")["image_size"] == [64, 64]
    assert len(calls) == 1
    monkeypatch.setattr(batch, "PROGRESS_FROM", 10)
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(20)))
    result = cli("batch", str(prompts), *DEMO, "--res", "64", "-o", "out", "--dry-run")
    assert result.code == 0, result.err
    assert any("checking" in line and "/20 entries" in line for line in result.err_lines)


# ---------------------------------------------------------------- 6. launcher variables without a launcher


@pytest.mark.parametrize("env,code,needle", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, 2, "MASTER_ADDR"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "LINFUSION_GROUP_TIMEOUT": "2"}, 1,
     "did not start within 2 s"),
], ids=["no-master", "no-peer"])
@pytest.mark.slow
def test_launcher_variables_left_behind_are_one_line(cli_env, tmp_path, env, code, needle):
    import socket

    with socket.socket() as s:  # a free port for the store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prompts = _jsonl(tmp_path / "p.jsonl", {"prompt": "a"})
    proc = run_subprocess([sys.executable, "-m", "linfusion_cli", "batch", str(prompts), *DEMO, "--res", "64",
                           "-o", "out", "--dry-run"], dict(cli_env, MASTER_PORT=str(port), **env),
                          cwd=tmp_path, timeout=300)
    err = [line for line in proc.stderr.decode().splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr.decode()
    assert len(err) == 1 and needle in err[0] and "unexpected" not in err[0], err


# ---------------------------------------------------------------- 7. adapters checked from their headers


@pytest.fixture(scope="module")
def demo_controlnet(tmp_path_factory):
    """A ControlNet folder that fits the demo model."""
    from diffusers import UNet2DConditionModel

    from linfusion_cli.models.tiny import DEMO_UNET_CONFIGS, save_tiny_controlnet

    unet = UNet2DConditionModel.from_config(dict(DEMO_UNET_CONFIGS["sd15"]))
    return save_tiny_controlnet(tmp_path_factory.mktemp("cn") / "cn", unet)


def _lora(t: Path, tensors: dict) -> list[str]:
    from safetensors.torch import save_file

    save_file(tensors, str(t / "l.safetensors"))
    return ["--lora", str(t / "l.safetensors")]


def _controlnet(t: Path, source: Path, change) -> list[str]:
    import shutil

    folder = t / "cn"
    shutil.copytree(source, folder)
    change(folder / "diffusion_pytorch_model.safetensors")
    return ["--controlnet", str(folder), "--control-image", str(t / "i.png")]


def _reshaped(file: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    tensors["conv_in.weight"] = torch.zeros(7, *tensors["conv_in.weight"].shape[1:])
    save_file(tensors, str(file))


def _pickled(file: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(str(file)), file.with_suffix(".bin"))
    file.unlink()


ATTN = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
MISFITS = {
    "lora-rank": (lambda t, cn: _lora(t, {f"{ATTN}.lora_A.weight": torch.zeros(2, 16),
                                          f"{ATTN}.lora_B.weight": torch.zeros(16, 3)}), "rank"),
    "lora-width": (lambda t, cn: _lora(t, {f"{ATTN}.lora_A.weight": torch.zeros(2, 999),
                                           f"{ATTN}.lora_B.weight": torch.zeros(999, 2)}), "does not fit"),
    "lora-dtype": (lambda t, cn: _lora(t, {f"{ATTN}.lora_A.weight": torch.zeros(2, 16, dtype=torch.int32),
                                           f"{ATTN}.lora_B.weight": torch.zeros(16, 2)}), "floating point"),
    "controlnet-no-weights": (lambda t, cn: _controlnet(t, cn, Path.unlink), "no weights"),
    "controlnet-truncated": (lambda t, cn: _controlnet(t, cn, lambda f: f.write_bytes(f.read_bytes()[:-999])),
                             "not a readable"),
    "controlnet-other-family": (lambda t, cn: _controlnet(t, cn, _reshaped), "do not fit"),
    "controlnet-pickle": (lambda t, cn: _controlnet(t, cn, _pickled), "--allow-pickle"),
    "ip-adapter-zero-tokens": (lambda t, cn: _encoder_case(t) and _zero_tokens(t), "no image tokens"),
    "linfusion-missing": (lambda t, cn: ["--linfusion", str(t / "nowhere")], "not found"),
}


def _zero_tokens(t: Path) -> list[str]:
    from safetensors.torch import save_file

    from linfusion_cli.models.tiny import DEMO_UNET_CONFIGS

    cross = DEMO_UNET_CONFIGS["sd15"]["cross_attention_dim"]
    save_file({"image_proj.proj.weight": torch.zeros(0, 32), "ip_adapter.1.to_k_ip.weight": torch.zeros(8, cross)},
              str(t / "ip.safetensors"))
    return ["--ip-adapter", str(t / "ip.safetensors"), "--ip-image", str(t / "i.png")]


@pytest.mark.parametrize("case", list(MISFITS))
def test_adapter_misfits_are_found_from_headers_at_plan_time(cli, tmp_path, monkeypatch, demo_controlnet, case):
    no_load(monkeypatch)
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "i.png")
    setup, needle = MISFITS[case]
    line = one_error(cli("generate", "x", *DEMO, "--res", "64", *setup(tmp_path, demo_controlnet),
                         "--dry-run"), 2, needle)
    assert "weights_only=False" not in line and "weights_only` set to `False" not in line


def test_no_message_advises_the_unsafe_load():
    import pickle

    from linfusion_cli.adapters.common import reason
    from linfusion_cli.cli.console import one_line_of

    exc = pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with `weights_only` "
                                 "set to `False` will likely succeed")
    for text in (reason(exc), one_line_of(exc)):
        assert "False" not in text and "unexpected" not in text


# ---------------------------------------------------------------- 8. a damaged manifest


def test_damaged_manifest_lines_are_ignored_with_a_note(cli, tmp_path):
    args = ("batch", "-", *DEMO, "--res", "64", "--seed", "1", "--json", "-o", "out/")
    assert cli(*args, "-q", stdin="one\n").code == 0
    path = tmp_path / "out" / MANIFEST_NAME
    good = json.loads(path.read_text())
    bad = [dict(good, index="zero"), dict(good, index=1, seed="x"), dict(good, index=1, params=[1]),
           dict(good, index=1, size=True), [1, 2]]
    with open(path, "ab") as fh:
        fh.write(b"".join(json.dumps(row).encode() + b"\n" for row in bad))
        fh.write(b'{"index": 1, "path": "\xff\xfe\xfd')  # a torn last line, invalid UTF-8
    result = cli(*args, "--resume", stdin="one\ntwo\n")
    assert result.code == 0, result.err
    assert [json.loads(line).get("skipped", False) for line in result.out_lines] == [True, False]
    assert any("6 damaged lines" in line and "ignored" in line for line in result.err_lines), result.err
    assert sorted(Manifest(tmp_path / "out").load().records) == [0, 1]


# ---------------------------------------------------------------- 9. the smaller list


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_smaller_cases(cli, tmp_path, monkeypatch):
    import socket

    from linfusion_cli.io.metadata import read_metadata
    from linfusion_cli.models import loading
    from linfusion_cli import testhooks

    # ~ is expanded for every path (a preset file, -o)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_preset(tmp_path / "home" / "p.yaml", LADDER)
    result = cli("generate", "x", "--preset", "~/p.yaml", "--res", "128", "-o", "~/out/", "--dry-run", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["path"].startswith(str(tmp_path / "home" / "out"))
    # duplicate preset keys; memory knobs bounded like the flags
    for text, needle in (("steps: 2\nsteps: 3\n", "given twice"), ("memory: {ff_chunk: 1000000000000}\n", "ff_chunk")):
        preset = write_preset(tmp_path / "bad.yaml", "model: demo\n" + text)
        one_error(cli("generate", "x", "--preset", str(preset), "--res", "64", "--dry-run"), 2, needle)
    # a newline in an output name
    prompts = _jsonl(tmp_path / "p.jsonl", {"prompt": "a", "output": "a\nb.png"})
    one_error(cli("batch", str(prompts), *DEMO, "--res", "64", "-o", "out", "--dry-run"), 2, "line break")
    one_error(cli("generate", "x", *DEMO, "--res", "64", "-o", "out/a\nb.png", "--dry-run"), 2, "line break")
    # batch --dry-run --json lines carry index and path
    prompts = tmp_path / "two.txt"
    prompts.write_text("a\nb\n")
    rows = [json.loads(line) for line in cli("batch", str(prompts), *DEMO, "--res", "64", "-o", "out",
                                             "--dry-run", "--json").out_lines]
    assert [r["index"] for r in rows] == [0, 1] and all(r["path"].startswith("out") for r in rows)
    # the dtype has one name in the dry run and in the record; a stale .part file is cleaned
    host = socket.gethostname().replace(".", "_")
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / f".x.png.{host}-{_dead_pid()}.abcd1234.part"
    stale.write_bytes(b"half an image")
    planned = json.loads(cli("generate", "x", *DEMO, "--res", "64", "--dry-run", "--json").out)
    made = cli("generate", "x", *DEMO, "--res", "64", "-o", "out/x.png", "-q")
    assert made.code == 0, made.err
    assert planned["dtype"] == read_metadata(tmp_path / "out" / "x.png")["record"]["dtype"] == "fp32"
    assert not stale.exists()
    # no empty output folder when loading fails (generate and batch)
    from linfusion_cli.cli import common
    from linfusion_cli.errors import ModelNotFoundError

    def fail(*a, **k):
        raise ModelNotFoundError("no such model")

    monkeypatch.setattr(common, "load", fail)
    one_error(cli("generate", "x", *DEMO, "--res", "64", "-o", "new1/x.png"), 2, "no such model")
    one_error(cli("batch", str(prompts), *DEMO, "--res", "64", "-o", "new2/deeper"), 2, "no such model")
    assert not (tmp_path / "new1").exists() and not (tmp_path / "new2").exists()
    # a read-only cache is said to be one, not a missing download
    monkeypatch.setenv("LINFUSION_CACHE", str(tmp_path / "ro-cache"))

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro-cache"))

    monkeypatch.setattr("linfusion_cli.models.tiny.save_tiny_pipeline", read_only)
    with pytest.raises(Exception) as info:
        loading.demo_folder("demo")
    assert "cannot build the demo model" in str(info.value) and "Permission denied" in str(info.value)
    # an empty HOME does not put the cache at the root
    monkeypatch.delenv("LINFUSION_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "")
    assert loading.cache_dir().is_absolute() and loading.cache_dir() != Path("/.cache/linfusion")
    # the test hook does nothing without the second, test-only variable
    monkeypatch.setenv(testhooks.AFTER_IMAGES, "*:1")
    monkeypatch.delenv(testhooks.ENABLE, raising=False)
    testhooks.after_images(0, 1)  # would exit the process if honoured
    # free-space refusals show two different numbers
    from linfusion_cli.io import targets

    need = targets.image_bound(64, 64, "png")
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(targets.shutil, "disk_usage", lambda p: usage(1, 1, need - 700))
    with pytest.raises(Exception) as info:
        targets.check_free_space(None, tmp_path / "x.png", "png", need=need, what="x")
    have, want = str(info.value).split(" free")[0].split("has ")[1], str(info.value).split("up to ")[1].split(" (")[0]
    assert have != want, str(info.value)
