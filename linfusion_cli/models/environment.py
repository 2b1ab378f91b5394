"""The machine as a run sees it: package versions, devices and their memory, the model caches
and the models in them (`linfusion info`)."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import torch

from .. import hostmem
from .loading import cache_dir


def gather() -> dict:
    """Versions, devices (free and total memory), caches: JSON-safe."""
    versions = {"python": platform.python_version()}
    for pkg in ("linfusion-cli", "torch", "diffusers", "transformers", "accelerate", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    ram = hostmem.host_memory()
    devices = [{"device": "cpu", "cores": os.cpu_count(), "total_gib": round(ram.total / 2**30, 1),
                "free_gib": round(ram.available / 2**30, 1)}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            devices.append({"device": f"cuda:{i}", "name": torch.cuda.get_device_name(i),
                            "total_gib": round(total / 2**30, 1), "free_gib": round(free / 2**30, 1)})
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append({"device": "mps"})
    return {"versions": versions, "devices": devices, "caches": _caches(cache_dir())}


def _caches(own) -> dict:
    """The hub cache's models and the demo models built in our own cache."""
    from huggingface_hub import constants

    models = []
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            models.append({"repo": repo.repo_id, "type": repo.repo_type,
                           "size_gib": round(repo.size_on_disk / 2**30, 2)})
    except Exception:  # no cache yet, or an unreadable one: nothing cached to list
        pass
    demos = sorted(p.name for p in own.glob("demo-*")) if own.is_dir() else []
    return {"hub_cache": str(constants.HF_HUB_CACHE), "linfusion_cache": str(own),
            "hub_models": models, "demo_models": demos}
