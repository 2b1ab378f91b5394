"""benchmarks/gpu_16k.py, the one-command GPU check, end to end on the CPU (--cpu-smoke): a GPU
session gets one try at it, so every case must at least take its code path before it gets there.

No timings are asserted: only that the JSON has every part the GPU run will fill in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_16k

ROOT = Path(__file__).resolve().parents[1]
CASES = [name for name, _what, _fn in gpu_16k.CASES]


def _smoke(tmp_path: Path) -> tuple[dict, str]:
    """Run the script as the GPU session will (a module from the repo root): (its JSON, stdout)."""
    out = tmp_path / "gpu_16k.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LINFUSION_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_16k", "--cpu-smoke",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_cpu_smoke_runs_every_case_and_writes_predictions(tmp_path):
    data, stdout = _smoke(tmp_path)
    assert data["mode"] == "cpu-smoke" and data["done"] is True
    pre = data["preflight"]
    assert pre["torch"] and pre["device"] is None and pre["copy"] is None  # CUDA-only: null
    assert data["gpu_model"]["sustained_tflops"] > 0
    assert list(data["cases"]) == CASES
    for name, case in data["cases"].items():
        assert case["status"] == "ok", (name, case.get("error"), case.get("traceback"))
        assert case["runs"], name
        for variant, run in case["runs"].items():
            where = f"{name}/{variant}"
            assert run["time_s"] > 0 and len(run["times_s"]) >= 1, where
            assert run["max_allocated_bytes"] is None, where  # CUDA-only
            assert run["cost"]["flops"] > 0 and run["cost_source"], where
            assert run["predicted"]["predicted_s"] > 0, where
            assert run["measured_over_predicted"] > 0 and run["achieved_tflops"] > 0, where
        assert name in stdout  # the summary table
    bands = data["cases"]["unet_bands"]
    assert bands["max_abs_diff"] < 1e-3 * max(1.0, bands["max_abs_output"])  # fp32 here
    big = data["cases"]["unet_16k"]
    assert big["setup"]["plan"]["band_rows"] and big["check"] is None
    assert data["cases"]["vae_decode_tile"]["report"]["tiles"] == 1
    assert data["cases"]["vae_attention"]["exact"] is True
    assert data["cases"]["sdxl_dilated"]["dilation"] == 2


@pytest.mark.slow  # a full-size meta trace or several runs: not the quick tier
def test_dry_smoke_plans_and_predicts_without_running(tmp_path):
    out = tmp_path / "dry.json"
    assert gpu_16k.main(["--cpu-smoke", "--dry", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["mode"] == "dry" and list(data["cases"]) == CASES
    for name, case in data["cases"].items():
        assert case["status"] == "ok", (name, case.get("error"))
        assert all(r.get("time_s") is None for r in case["runs"].values()), name
    assert data["cases"]["unet_16k"]["runs"]["step"]["predicted"]["predicted_s"] > 0


def test_time_guard_skips_cases_and_still_writes_every_one(tmp_path):
    out = tmp_path / "guard.json"
    assert gpu_16k.main(["--cpu-smoke", "--budget-s", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["done"] is True and data["preflight"]["torch"]
    assert [c["status"] for c in data["cases"].values()] == ["skipped"] * len(CASES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="would run the GPU check")
def test_without_cuda_the_gpu_run_measures_nothing_and_exits_0(tmp_path, capsys):
    assert gpu_16k.main(["--json", str(tmp_path / "none.json")]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "none.json").exists()
