"""`linfusion info`: versions, devices and their memory, caches and the models in them."""

from __future__ import annotations

import json as jsonlib

from .options import Json
from ..models.environment import gather


def info(json: Json = False) -> None:
    """Versions, devices and their memory, cache locations, cached models."""
    data = gather()
    if json:
        print(jsonlib.dumps(data))
        return
    print("versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()))
    for d in data["devices"]:
        extra = ", ".join(f"{k} {v}" for k, v in d.items() if k != "device")
        print(f"device {d['device']}: {extra}")
    c = data["caches"]
    print(f"hub cache: {c['hub_cache']}")
    print(f"linfusion cache: {c['linfusion_cache']}")
    for m in c["hub_models"]:
        print(f"  cached {m['type']} {m['repo']} ({m['size_gib']} GiB)")
    for name in c["demo_models"]:
        print(f"  demo model {name}")
