"""Device-memory planning: estimate a stage's peak from model configs, pick knobs, apply them.

Importing this package does not import torch or diffusers (knobs.py does, import it directly).
"""

from .estimate import Knobs, estimate_peak_bytes, param_count
from .planner import (
    MemoryPlan,
    candidate_plans,
    load_family_config,
    load_family_configs,
    next_tighter,
    plan_memory,
)

__all__ = [
    "Knobs", "MemoryPlan", "candidate_plans", "estimate_peak_bytes", "load_family_config",
    "load_family_configs", "next_tighter", "param_count", "plan_memory",
]
