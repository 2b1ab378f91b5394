"""Device-memory planning: estimate a stage's peak from model configs, pick knobs, apply them.

Importing this package does not import torch or diffusers (knobs.py does, import it directly).
"""

from .estimate import Knobs, estimate_peak_bytes, param_count
from .planner import KNOB_NAMES, BudgetError, MemoryPlan, candidate_plans, load_family_configs, choose_knobs

__all__ = [
    "KNOB_NAMES", "BudgetError", "Knobs", "MemoryPlan", "candidate_plans", "estimate_peak_bytes",
    "load_family_configs", "param_count", "choose_knobs",
]
