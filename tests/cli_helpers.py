"""Shared helpers for the CLI tests: results, subprocess runs, files (fixtures live in conftest.py).

Every run uses `--model demo` (a tiny random pipeline built once per test session into a shared
LINFUSION_CACHE) with HF_HUB_OFFLINE=1, so nothing is ever downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A user preset that makes several stages cheap: native 64 px base, then x2 stages.
TINY_PRESET = """\
description: tiny test ladder (demo model, 64 px base)
model: demo
native: 64
steps: 2
guidance: 7.5
scheduler: ddim
strengths: [0.5]
"""


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    @property
    def out_lines(self) -> list[str]:
        return [line for line in self.out.splitlines() if line.strip()]


def scripts_dir() -> Path:
    """Where pip put the `linfusion` console script for this interpreter."""
    return Path(sysconfig.get_path("scripts"))


def run_subprocess(args: list[str], env: dict, *, input: bytes | str | None = None,
                   cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """A subprocess with bytes stdout/stderr."""
    if isinstance(input, str):
        input = input.encode()
    return subprocess.run(args, env=env, input=input, cwd=cwd, capture_output=True, timeout=timeout,
                          check=False, stdin=None if input is not None else subprocess.DEVNULL)


def files_under(folder: Path) -> list[Path]:
    """Every file below folder (hidden ones included); [] when the folder does not exist."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).exists() else []


def write_preset(path: Path, text: str = TINY_PRESET) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def pixels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def parameters_fields(parameters: str) -> dict[str, str]:
    """The `k: v, ...` line of an A1111 `parameters` text as a dict (JSON-quoted values unquoted)."""
    import json

    parts, buf, in_quotes, escaped = [], "", False, False
    for ch in parameters.splitlines()[-1]:
        if in_quotes:
            escaped, in_quotes = (False, True) if escaped else (ch == "\\", ch != '"')
            buf += ch
        elif ch == ",":
            parts.append(buf)
            buf = ""
        else:
            in_quotes = ch == '"'
            buf += ch
    parts.append(buf)
    fields = {}
    for part in parts:
        key, _, value = part.strip().partition(": ")
        fields[key] = json.loads(value) if value.startswith('"') else value
    return fields


# ---------------------------------------------------------------- what a refused command looks like

DEMO = ("--model", "demo", "--steps", "2")  # the tiny demo pipeline, two steps
LADDER = "description: two stages\nmodel: demo\nnative: 64\nsteps: 2\nstrengths: [0.5]\n"


def one_error(result: Result, *needles: str, code: int = 2) -> str:
    """The command failed with `code`, one line on stderr holding every needle, nothing on stdout."""
    assert result.code == code, (result.code, result.err)
    assert len(result.err_lines) == 1 and result.out == "", (result.err, result.out)
    for needle in needles:
        assert needle in result.err_lines[0], (needle, result.err_lines[0])
    assert "unexpected" not in result.err_lines[0]
    return result.err_lines[0]


def no_load(monkeypatch) -> None:
    """Fail the test if a model is loaded (the check had to come before)."""
    from linfusion_cli.cli import runs

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runs, "load", refuse)


def write_bytes(path: Path, data: bytes) -> Path:
    """A file (and its folders) holding exactly `data`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_jsonl(path: Path, *rows: dict) -> Path:
    """A JSON-lines prompt file, a row per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def ip_adapter_case(t: Path) -> list[str]:
    """Flags for an IP-Adapter whose image encoder's config asks for 300000 layers (never built)."""
    import torch
    from safetensors.torch import save_file

    from linfusion_cli.models.tiny import DEMO_UNET_CONFIGS

    cross = DEMO_UNET_CONFIGS["sd15"]["cross_attention_dim"]
    save_file({"image_proj.proj.weight": torch.zeros(4 * cross, 32),
               "ip_adapter.1.to_k_ip.weight": torch.zeros(8, cross)}, str(t / "ip.safetensors"))
    (t / "image_encoder").mkdir()
    (t / "image_encoder" / "config.json").write_text(json.dumps({"num_hidden_layers": 300000,
                                                                 "projection_dim": 32}))
    return ["--ip-adapter", str(t / "ip.safetensors"), "--ip-image", str(t / "i.png")]


def tiny_preset(tmp_path: Path) -> tuple[str, ...]:
    """--preset with the tiny ladder (TINY_PRESET) written under tmp_path."""
    return ("--preset", str(write_preset(tmp_path / "tiny.yaml")))


def json_lines(err: str) -> list[dict]:
    """Every non-empty stderr line as JSON (fails on the first that is not)."""
    return [json.loads(line) for line in err.splitlines() if line.strip()]
