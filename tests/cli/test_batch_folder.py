"""A batch's folder: one entry's failure leaves the others, two processes lose no image, lines
are newline lines, a damaged manifest is read around, validation reads a shared image once."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from linfusion_cli.io.manifest import MANIFEST_NAME, Manifest

from ..cli_helpers import DEMO, files_under, run_subprocess


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


def test_batch_validation_decodes_a_shared_image_once_and_shows_progress(cli, tmp_path, monkeypatch):
    from PIL import Image

    from linfusion_cli.adapters import file_checks
    from linfusion_cli.jobs import entries
    from linfusion_cli.io import images

    Image.new("RGB", (64, 64)).save(tmp_path / "i.png")
    calls = []
    real = images.open_image
    monkeypatch.setattr(images, "open_image", lambda p: calls.append(p) or real(p))
    file_checks._image_size.cache_clear()
    for _ in range(30):
        assert file_checks.check_image(str(tmp_path / "i.png"), "--control-image")["image_size"] == [64, 64]
    assert len(calls) == 1
    monkeypatch.setattr(entries, "PROGRESS_FROM", 10)
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(20)))
    result = cli("batch", str(prompts), *DEMO, "--res", "64", "-o", "out", "--dry-run")
    assert result.code == 0, result.err
    assert any("checking" in line and "/20 entries" in line for line in result.err_lines)


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
