"""Bad input and interruptions: exit code, exactly one line on stderr, nothing left behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from linfusion_cli.io.metadata import read_metadata

from ..cli_helpers import files_under, one_error, run_subprocess, write_preset


DEMO = ("--model", "demo", "--steps", "2")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# (id, setup(tmp) -> extra args, expected exit code, substrings of the message)
CASES = {
    "size-not-multiple-of-8": (lambda t: ["generate", "x", *DEMO, "--width", "1001", "--height", "1000"],
                               2, ["1001", "multiple of 8"]),
    "res-not-multiple-of-8": (lambda t: ["generate", "x", *DEMO, "--res", "300"], 2, ["multiple of 8"]),
    "size-above-32768": (lambda t: ["generate", "x", *DEMO, "--res", "32776"], 2, ["32768"]),
    "width-above-32768": (lambda t: ["generate", "x", *DEMO, "--width", "40000", "--height", "64"],
                          2, ["32768"]),
    "strength-above-1": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--strengths", "0.4,1.5"],
                         2, ["1.5", "(0, 1]"]),
    "strength-zero": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--strengths", "0"], 2, ["(0, 1]"]),
    "strength-not-a-number": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--strengths", "a,b"],
                              2, ["--strengths"]),
    "unknown-preset": (lambda t: ["generate", "x", "--preset", "no-such-preset", "--res", "64"],
                       2, ["no-such-preset", "sd15"]),
    "malformed-preset-yaml": (lambda t: ["generate", "x", "--res", "64", "--preset",
                                         str(write(t / "bad.yaml", "native: 64\nsteps: [1,\n"))],
                              2, ["bad.yaml", "YAML"]),
    "preset-unknown-key": (lambda t: ["generate", "x", "--res", "64", "--preset",
                                      str(write(t / "typo.yaml", "native: 64\nstrenghts: [0.5]\n"))],
                           2, ["typo.yaml", "strenghts"]),
    "preset-show-unknown-key": (lambda t: ["presets", "show",
                                           str(write(t / "typo.yaml", "native: 64\nstrenghts: [0.5]\n"))],
                                2, ["typo.yaml", "strenghts"]),
    "prompt-file-syntax-error": (lambda t: ["batch", str(write(t / "prompts.txt",
                                                              'a cat\n# note\n{"prompt": "a dog",\n')),
                                            *DEMO, "--res", "64", "-o", "out"],
                                 2, ["prompts.txt:3:", "JSON"]),
    "prompt-file-a1111-error": (lambda t: ["batch", str(write(t / "a1111.txt",
                                                             'ok\n--prompt "a" --seed abc\n')),
                                           *DEMO, "--res", "64", "-o", "out"],
                                2, ["a1111.txt:2:", "--seed"]),
    "prompt-file-bad-size": (lambda t: ["batch", str(write(t / "sizes.jsonl",
                                                          '{"prompt": "a", "width": 100, "height": 64}\n')),
                                        *DEMO, "--res", "64", "-o", "out"],
                             2, ["sizes.jsonl:1:", "multiple of 8"]),
    "prompt-file-missing": (lambda t: ["batch", "nowhere.txt", *DEMO, "-o", "out"], 2, ["nowhere.txt"]),
    "upscale-missing-image": (lambda t: ["upscale", "missing.png", "x", *DEMO, "--res", "64", "-o", "out/"],
                              2, ["missing.png"]),
    "upscale-not-an-image": (lambda t: ["upscale", str(write(t / "notes.png", "just text")), "x", *DEMO,
                                        "--res", "64", "-o", "out/"], 2, ["notes.png"]),
    "upscale-truncated-image": (lambda t: ["upscale", str(truncated_png(t / "cut.png")), "x", *DEMO,
                                           "--res", "64", "-o", "out/"], 2, ["cut.png"]),
    "unknown-model-path": (lambda t: ["generate", "x", "--model", str(t / "models" / "nope"), "--res", "64",
                                      "-q", "-o", "out/"], 2, ["nope"]),
    "output-under-a-file": (lambda t: ["generate", "x", *DEMO, "--res", "64", "-o",
                                       str(write(t / "out" / "afile", "x").parent / "afile" / "sub" / "y.png")],
                            2, ["afile"]),
    "format-mismatch": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--format", "jpg", "-o", "out/y.png"],
                        2, ["jpg"]),
    "unknown-format": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--format", "bmp", "-o", "out/"],
                       2, ["bmp"]),
    "unknown-scheduler": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--scheduler", "bogus",
                                     "-o", "out/"], 2, ["bogus"]),
    "unknown-dtype": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--dtype", "fp8", "-o", "out/"],
                      2, ["fp8"]),
    "missing-cuda": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--device", "cuda:7", "-o", "out/"],
                     2, ["cuda"]),
    "width-without-height": (lambda t: ["generate", "x", *DEMO, "--width", "64"], 2, ["--height"]),
    "bad-vae-tile": (lambda t: ["generate", "x", *DEMO, "--res", "64", "--vae-tile", "100"], 2, ["--vae-tile"]),
    "batch-to-stdout": (lambda t: ["batch", str(write(t / "p.txt", "a\n")), *DEMO, "-o", "-"], 2, ["-o"]),
    "unknown-option": (lambda t: ["generate", "x", "--bogus-flag"], 2, ["--bogus-flag"]),
    "unknown-command": (lambda t: ["paint", "x"], 2, ["paint"]),
    "upscale-without-image": (lambda t: ["upscale"], 2, ["image"]),
}


def truncated_png(path: Path) -> Path:
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(cli, tmp_path, case):
    setup, code, needles = CASES[case]
    args = setup(tmp_path)
    before = set(files_under(tmp_path))
    result = cli(*args)
    one_error(result, *needles, code=code)
    assert set(files_under(tmp_path)) == before, "no file left behind"
    assert not [p for p in files_under(tmp_path) if p.name.endswith(".part")]


def test_existing_output_is_not_overwritten(cli, tmp_path):
    target = write(tmp_path / "out" / "keep.png", "precious bytes")
    result = cli("generate", "x", *DEMO, "--res", "64", "-o", str(target))
    one_error(result, "keep.png", "--overwrite")
    assert target.read_text() == "precious bytes"
    assert files_under(tmp_path / "out") == [target]


def test_existing_output_in_batch_is_not_overwritten(cli, tmp_path):
    target = write(tmp_path / "out" / "0000-a-cat.png", "precious bytes")
    result = cli("batch", "-", *DEMO, "--res", "64", "-o", "out", stdin="a cat\na dog\n")
    one_error(result, "0000-a-cat.png", "--overwrite")
    assert target.read_text() == "precious bytes"
    assert files_under(tmp_path / "out") == [target]


def test_interrupt_in_process_is_exit_130(cli, tmp_path, monkeypatch):
    from linfusion_cli import api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "generate_file", interrupted)
    result = cli("generate", "x", *DEMO, "--res", "64", "-q", "-o", "out/")
    one_error(result, "interrupted", code=130)
    assert files_under(tmp_path / "out") == []


# A child that runs the CLI and, at a chosen point, blocks until a signal arrives: the test sends
# its signal after an event (a file appearing), never after a guessed delay, and the run cannot
# finish before the signal.
CHILD = r"""
import sys, time
from pathlib import Path
marker, mode, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]

def block(what):
    marker.write_text(what)
    while True:  # until the test's signal arrives
        time.sleep(0.01)

if mode == "import":  # block while the CLI imports typer
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name == "typer":
                block("importing")
            return None
    sys.meta_path.insert(0, Blocker())
else:  # block once stage 1's image is published
    from linfusion_cli.io import images
    real = images.save_image
    def save_image(image, path, **kwargs):
        written = real(image, path, **kwargs)
        if path is not None and ".stage1-" in Path(path).name:
            block(str(written))
        return written
    images.save_image = save_image
from linfusion_cli.cli.app import main
sys.argv = ["linfusion", *argv]
main()
"""

SIGNALS = [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "interrupted (SIGTERM)"),
           (signal.SIGHUP, 129, "interrupted (SIGHUP)")]


def signal_child(env, marker: Path, mode: str, args: list[str], signum: int):
    """Run CHILD, wait (polling) for its marker file, send signum; (exit code, stdout, stderr lines)."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), mode, *args], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while not marker.exists():
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"the child ended before blocking: {proc.returncode} {err.decode()}")
            time.sleep(0.02)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stdout, [line for line in stderr.decode().splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("signum,code,line", SIGNALS, ids=[s.name for s, _, _ in SIGNALS])
def test_ctrl_c_keeps_finished_stages_and_no_partial_file(cli_env, tmp_path, signum, code, line):
    """A signal after stage 1 is saved: exit 128+N, one line, no final or .part file, stage 1 intact."""
    preset = write_preset(tmp_path / "ladder.yaml", "description: slow ladder\nmodel: demo\nnative: 64\n"
                                                    "steps: 4\nstrengths: [1.0]\n")
    out = tmp_path / "out"
    final = out / "final.png"
    stage1 = out / "final.png.stage1-64x64.png"
    returncode, stdout, lines = signal_child(
        cli_env, tmp_path / "blocked", "run",
        ["generate", "a slow ladder", "--preset", str(preset), "--res", "256", "--seed", "1",
         "--save-stages", "-q", "-o", str(final)], signum)
    assert returncode == code, lines
    assert lines == [f"error: {line}"]
    assert stdout == b""
    assert not final.exists(), "no partial final image"
    assert files_under(out) == [stage1], "stage 1 kept, nothing else (no .part file)"
    with Image.open(stage1) as im:
        im.load()
        assert im.size == (64, 64)
    assert read_metadata(stage1)["record"]["stages"][0]["width"] == 64


@pytest.mark.parametrize("signum,code,line", SIGNALS, ids=[s.name for s, _, _ in SIGNALS])
@pytest.mark.slow
def test_signal_while_importing_is_one_line(cli_env, tmp_path, signum, code, line):
    returncode, stdout, lines = signal_child(cli_env, tmp_path / "blocked", "import",
                                             ["generate", "x", "--model", "demo", "-o", "out/"], signum)
    assert returncode == code, lines
    assert lines == [f"error: {line}"], "the same line as during a run"
    assert stdout == b"" and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_subprocess_bad_input_exit_code_and_one_line(cli_env, tmp_path):
    """The same contract through the console script (rich markup must not leak on a pipe)."""
    proc = run_subprocess(["linfusion", "generate", "x", "--model", "demo", "--res", "1004",
                           "-o", str(tmp_path / "out/")], cli_env)
    lines = [line for line in proc.stderr.decode().splitlines() if line.strip()]
    assert proc.returncode == 2 and proc.stdout == b""
    assert len(lines) == 1 and lines[0].startswith("error: ") and "[" not in lines[0][:8]
    assert files_under(tmp_path / "out") == []
