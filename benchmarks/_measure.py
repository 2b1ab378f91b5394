"""Run one measurement in a fresh process so its peak resident memory is its own."""

from __future__ import annotations

import json
import subprocess
import sys


def run_isolated(module: str, function: str, **kwargs) -> dict:
    """Call module.function(**kwargs) in a child process; it returns a JSON-able dict."""
    code = (
        "import json, sys, resource, psutil, importlib\n"
        f"sys.path.insert(0, {repr(sys.path[0])})\n"
        f"fn = getattr(importlib.import_module({module!r}), {function!r})\n"
        "result = fn(**json.loads(sys.argv[1]))\n"
        "result['peak_rss_gib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20\n"
        "print(json.dumps(result))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])
