"""Add-ons loaded on top of a model: LoRA, ControlNet, tile ControlNet, IP-Adapter.

Every adapter is parsed and checked when the plan is made (before any weights load) and mounted
by `mount_adapters` after LinFusion, so LoRA also reaches the LinFusion layers' projections.
"""

from .lora import LoraSpec, check_lora, load_loras, parse_lora
from .attach import check_adapters, describe, mount_adapters

__all__ = ["LoraSpec", "parse_lora", "check_lora", "load_loras", "check_adapters", "describe",
           "mount_adapters"]
