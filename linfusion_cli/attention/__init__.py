"""LinFusion linear attention for diffusers UNets: ops, layer, official checkpoints, mounting."""

from .checkpoint import ModuleSpec, load_checkpoint, parse_modules_list, save_checkpoint
from .matching import KNOWN_BASES, linfusion_repo_for, require_linfusion_repo
from .module import LinFusionAttention
from .ops import linear_attention
from .patch import apply_linfusion, linfusion_layers, remove_linfusion, self_attention_specs

__all__ = [
    "KNOWN_BASES", "LinFusionAttention", "ModuleSpec", "apply_linfusion", "linear_attention",
    "linfusion_layers", "linfusion_repo_for", "load_checkpoint", "parse_modules_list",
    "remove_linfusion", "require_linfusion_repo", "save_checkpoint", "self_attention_specs",
]
