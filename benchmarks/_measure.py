"""What every benchmark shares: the repo root, one peak-memory meter, fresh-process runs, configs.

Benchmarks run as modules from the repo root (`python -m benchmarks.NAME`), so Python puts the
root first on sys.path and the checkout's linfusion_cli is the one measured; ROOT names the root
for child processes. Model configs come from the package's shipped ones (shipped_config), never
from copies here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def max_rss() -> int:
    """This process's highest resident memory so far, bytes (the OS's own figure, ru_maxrss)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; Linux: KiB


def rss() -> int:
    """This process's resident memory now, bytes."""
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """Peak resident memory of this process over a `with` block (or since `reset()`), bytes.

    `peak` is exact when the window sets a new process high (ru_maxrss rose), else the highest
    RSS a thread sampled every `interval` seconds (interval None: no thread, for a fresh
    process whose measured call sets the high anyway); `base` is the RSS at the window's start,
    `rise` = peak - base. Read after the block, the figures are the block's; the process's
    highest since it started is max_rss().
    """

    def __init__(self, interval: float | None = 0.002):
        self.interval, self._final = interval, None

    def __enter__(self) -> "PeakRSS":
        self.reset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self.interval is not None:
            self._thread.start()
        return self

    def reset(self) -> None:
        """Start a new window: its base and peak are the RSS now."""
        self.base = self._top = rss()
        self._max0 = max_rss()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._top = max(self._top, rss())

    @property
    def peak(self) -> int:
        if self._final is not None:
            return self._final
        high = max_rss()
        return max(self._top, rss(), high if high > self._max0 else 0)

    @property
    def rise(self) -> int:
        return self.peak - self.base

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._final = self.peak


def run_isolated(module: str, function: str, **kwargs) -> dict:
    """Call module.function(**kwargs) in a fresh process (its memory is its own); it returns a
    JSON-able dict, to which the child's whole-life peak RSS is added as peak_rss_gib."""
    code = (
        "import importlib, json, sys\n"
        "from benchmarks._measure import max_rss\n"
        f"fn = getattr(importlib.import_module({module!r}), {function!r})\n"
        "result = fn(**json.loads(sys.argv[1]))\n"
        "result['peak_rss_gib'] = max_rss() / 2**30\n"
        "print(json.dumps(result))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True,
                         text=True, check=False, cwd=ROOT)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def shipped_config(family: str, part: str) -> dict:
    """The package's shipped diffusers config ("unet", "vae", "scheduler") of a family."""
    from linfusion_cli.models.resolve import bundled_config

    return bundled_config(family, part)

