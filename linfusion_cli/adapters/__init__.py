"""Add-ons loaded on top of a model: LoRA, ControlNet, tile ControlNet, IP-Adapter.

Every adapter is parsed and checked when the plan is made (before any weights load) and mounted
by `mount_adapters` after LinFusion, so LoRA also reaches the LinFusion layers' projections.
"""

from .lora import LoraSpec, check_lora, load_loras, parse_lora
from .plan import check_adapters, describe, mount_adapters

# Request fields that ask for an adapter (the scales alone are checked against these)
ADAPTER_FIELDS = ("loras", "controlnet", "control_image", "control_scale", "tile_controlnet",
                  "tile_scale", "ip_adapter", "ip_image", "ip_scale", "ip_encoder")

__all__ = ["ADAPTER_FIELDS", "LoraSpec", "parse_lora", "check_lora", "load_loras", "check_adapters", "describe",
           "mount_adapters"]
