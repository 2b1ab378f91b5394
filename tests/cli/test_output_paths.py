"""Where outputs go: batch outputs stay inside -o, every written path (images, stage files, the
manifest) is checked before anything runs, collisions and NUL bytes refused, paths printed as given."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from linfusion_cli.io.manifest import MANIFEST_NAME

from ..cli_helpers import DEMO, LADDER, files_under, no_load, one_error, write_preset


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
    message = one_error(result, needle)
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
        one_error(result, "final")
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "nowhere.png").exists()


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
    one_error(result, needle)
    assert files_under(tmp_path) == before
    assert not (tmp_path / "created-outside.jsonl").exists()


@pytest.mark.parametrize("field", ["model", "preset", "linfusion", "negative", "prompt"])
def test_nul_bytes_in_any_name_refused_at_plan_time(field):
    """The library path too: a NUL in a path or name never reaches the filesystem or a tokenizer."""
    from linfusion_cli.errors import InputError
    from linfusion_cli.planning.request import Request, make_plan

    values = {"prompt": "x", "model": "demo", "res": 64, field: "bad\0name"}
    with pytest.raises(InputError, match="NUL byte"):
        make_plan(Request(**values))


def test_nul_byte_in_an_argument_is_one_line(cli, tmp_path):
    one_error(cli("generate", "x", *DEMO, "--res", "64", "-o", "a\0b/x.png"), "NUL byte")
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("output", [None, "out/", "out/x.png", "ABS"])
def test_paths_are_printed_as_given(cli, tmp_path, output):
    """Without -o the bare file name (in the cwd); with -o, -o joined with the name, as written."""
    preset = write_preset(tmp_path / "tiny.yaml")
    args = ["generate", "a cat", "--preset", str(preset), "--res", "64", "--seed", "3", "-q"]
    if output == "ABS":
        output = str(tmp_path / "abs") + "/"
    if output is not None:
        args += ["-o", output]
    r = cli(*args)
    assert r.code == 0, r.err
    printed = r.out.strip()
    if output is None:
        assert "/" not in printed and Path(printed).is_file()
    elif output.endswith("/"):
        assert printed.startswith(output) and "/" not in printed[len(output):]
    else:
        assert printed == output
    assert (Path.cwd() / printed).is_file()
    j = cli(*args, "--json", "--overwrite")
    assert json.loads(j.out)["path"] == printed


def test_batch_paths_are_printed_as_given(cli, tmp_path):
    preset = write_preset(tmp_path / "tiny.yaml")
    (tmp_path / "p.txt").write_text('a cat\n{"prompt": "a dog", "output": "sub/dog.png"}\n')
    r = cli("batch", "p.txt", "--preset", str(preset), "--res", "64", "--seed", "3", "-q",
            "--name", "{slug}-{seed}.{ext}")
    assert r.code == 0, r.err
    assert r.out_lines == ["a-cat-3.png", "sub/dog.png"]
