"""Every shell example of README.md does what its comment says, in a scratch folder.

Each example (every ```sh block, in order, `\\` continuations joined) is either run as written,
run in a form that works here (a GPU command as a dry run for an 80 GiB GPU), or skipped with
its reason below; an example this file does not know fails the quick test, so a new example
needs its promise written down here.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from .cli_helpers import ROOT, run_subprocess

README = (ROOT / "README.md").read_text()
MARKER = "<!-- the commands in this block are run by tests/test_readme.py -->"
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"


def shell_examples() -> list[str]:
    """Every command of every sh block, in README order (comments and blank lines dropped)."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split())
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def usage_commands() -> list[str]:
    assert MARKER in README, "README.md lost its usage block"
    block = re.search(r"```sh\n(.*?)```", README[README.index(MARKER):], re.DOTALL).group(1)
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


# ---------------------------------------------------------------- what each example promises

def _image(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def _stages(path: Path) -> int:
    from linfusion_cli.io.metadata import read_metadata

    return len(read_metadata(path)["record"]["stages"])


def _dry_stages(out: str) -> list[str]:
    return re.findall(r"stage \d+: (\d+x\d+)", out)


def check_headline(proc, cwd):  # 16384x16384 in six stages (dry run for an 80 GiB GPU)
    assert _dry_stages(proc.stdout.decode())[-1] == "16384x16384"
    assert len(_dry_stages(proc.stdout.decode())) == 6


def check_plan_16k(proc, cwd):
    assert _dry_stages(proc.stdout.decode()) == ["1024x512", "2048x1024", "4096x2048", "8192x4096",
                                                  "16384x8192"]


def check_plan_json(proc, cwd):
    plan = json.loads(proc.stdout)
    assert [(s["width"], s["height"]) for s in plan["stages"]][-1] == (8192, 4096)
    assert all(s["memory"]["estimated_peak_gib"] <= 24 for s in plan["stages"])


def check_generate(proc, cwd):  # "a 512x512 base, then x2 stages to 1024 and 2048; prints the path"
    path = cwd / proc.stdout.decode().strip()
    assert path.is_file() and path.parent == cwd / "out"
    assert _image(path) == (2048, 2048) and _stages(path) == 3


def check_save_stages(proc, cwd):  # "base 1024x512 kept as out/wide.png.stage1-1024x512.png, then out/wide.png"
    result = json.loads(proc.stdout)
    assert [(s["width"], s["height"]) for s in result["stages"]] == [(1024, 512), (2048, 1024)]
    assert _image(cwd / "out/wide.png.stage1-1024x512.png") == (1024, 512)
    assert _image(cwd / "out/wide.png") == (2048, 1024)


def check_upscale(proc, cwd):  # "one stage, 2048x1024"
    assert proc.stdout.decode().strip() == "out/up.jpg"
    assert _image(cwd / "out/up.jpg") == (2048, 1024) and _stages(cwd / "out/up.jpg") == 1


def check_batch(proc, cwd):  # "one stdout line per image"
    rows = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert sorted(r["index"] for r in rows) == [0, 1]
    assert all((cwd / r["path"]).is_file() for r in rows)


def check_prints(proc, cwd):
    assert proc.stdout.strip()


def check_version(proc, cwd):
    from importlib import metadata

    assert proc.stdout.decode().strip() == f"linfusion {metadata.version('linfusion-cli')}"


def check_prompts_file(proc, cwd):
    assert (cwd / "prompts.txt").read_text() == "a red boat\na blue boat\n"


def check_torchrun_demo(proc, cwd):  # one JSON line per image, over two processes
    rows = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert sorted(r["index"] for r in rows) == [0, 1]


def check_gpu_batch(proc, cwd):  # each entry planned at 16384x16384 within 80 GiB
    assert _dry_stages(proc.stdout.decode()).count("16384x16384") == 2


def check_band_parallel_plan(proc, cwd):  # one 16K image planned per rank of 8
    out = proc.stdout.decode()
    assert "parallel: bands, world_size 8" in out and _dry_stages(out)[-1] == "16384x16384"


AS_DRY_RUN = " --dry-run --max-vram 80"
GPU_BATCH = "needs 8 CUDA GPUs (two machines for the last); run here as one process's dry run"

# (start of the example, how it runs here or None to skip, the check or the skip's reason)
EXAMPLES = [
    ("python -m venv .venv && . .venv/bin/activate && pip install -e . && linfusion generate",
     lambda c: c.split(" && ")[-1] + AS_DRY_RUN, check_headline),
    ("python -m venv .venv && . .venv/bin/activate && pip install torch",
     None, "installs packages and runs this test suite itself"),
    ("python -m pytest -q --full-grid -m full_grid", None, "runs the full memory-knob grids (CI does, once)"),
    ('linfusion generate "a lighthouse at dusk" --res 16384', str, check_plan_16k),
    ('linfusion generate "a lighthouse at dusk" --res 8192', str, check_plan_json),
    ('linfusion generate "a lighthouse at dusk" --model demo --res 2048', str, check_generate),
    ('linfusion generate "a lighthouse at dusk" --model demo --width 2048', str, check_save_stages),
    ("linfusion upscale", str, check_upscale),
    ("printf 'a red boat\\na blue boat\\n' | linfusion batch", str, check_batch),
    ("linfusion presets list", str, check_prints),
    ("linfusion presets show", str, check_prints),
    ("linfusion info", str, check_prints),
    ("linfusion --version", str, check_version),
    ("printf 'a red boat\\na blue boat\\n' > prompts.txt", str, check_prompts_file),
    ("torchrun --standalone --nproc-per-node 2", str, check_torchrun_demo),
    ("torchrun --standalone --nproc-per-node 8 -m linfusion_cli batch",
     lambda c: "linfusion " + c.split(" -m linfusion_cli ")[1] + AS_DRY_RUN, check_gpu_batch),
    ("torchrun --standalone --nproc-per-node 8 -m linfusion_cli generate",
     lambda c: "linfusion " + c.split(" -m linfusion_cli ")[1] + " --world-size 8" + AS_DRY_RUN,
     check_band_parallel_plan),
    ("accelerate launch", lambda c: "linfusion " + c.split(" -m linfusion_cli ")[1] + AS_DRY_RUN,
     check_gpu_batch),
    ("torchrun --nnodes 2", lambda c: "linfusion " + c.split(" -m linfusion_cli ")[1]
     .replace("/shared/out/", "shared/out/") + AS_DRY_RUN, check_gpu_batch),
]


def classify(command: str):
    matches = [e for e in EXAMPLES if command.startswith(e[0])]
    assert len(matches) == 1, f"README example without one promise in tests/test_readme.py: {command}"
    return matches[0]


def test_every_readme_example_has_a_promise():
    commands = shell_examples()
    assert len(commands) >= 15
    for command in commands:
        classify(command)
    assert {c.split("|")[-1].split()[1] for c in usage_commands() if c.startswith(("linfusion", "printf"))} \
        >= {"generate", "upscale", "batch", "presets", "info", "--version"}


def test_demo_examples_make_several_stages():
    """The stage sizes the comments promise need sizes above the demo's 512 px base."""
    for command in usage_commands():
        if "--model demo" in command and "batch" not in command:
            size = re.search(r"--res (\d+)|--width (\d+)", command)
            assert int(size.group(1) or size.group(2)) > 1024 or "upscale" in command, command


@pytest.mark.slow
def test_readme_examples_do_what_they_say(cli_env, tmp_path):
    """In order (later examples read earlier outputs), from one fresh scratch folder."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    env = dict(cli_env, OMP_NUM_THREADS="1", PATH=f"{Path(TORCHRUN).parent}:{cli_env['PATH']}")
    skipped = []
    for command in shell_examples():
        _, form, check = classify(command)
        if form is None:
            skipped.append((command, check))
            continue
        run = form(command)
        proc = run_subprocess(["bash", "-o", "pipefail", "-c", run], env, cwd=cwd)
        assert proc.returncode == 0, f"{run}\n{proc.stderr.decode()[-2000:]}"
        check(proc, cwd)
    assert [reason for _, reason in skipped] == ["installs packages and runs this test suite itself",
                                                 "runs the full memory-knob grids (CI does, once)"]


@pytest.mark.parametrize("command", [c for c in usage_commands() if "--dry-run" in c])
@pytest.mark.slow
def test_readme_dry_runs_download_nothing(cli_env, tmp_path, command):
    """The dry runs plan the real sd15 preset offline: no model files appear anywhere."""
    cli_env = dict(cli_env, HF_HOME=str(tmp_path / "hf"))
    proc = run_subprocess(["bash", "-c", command], cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "Lykon/dreamshaper-8" in proc.stdout.decode()
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))
