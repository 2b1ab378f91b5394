"""The adapters of a request, parsed and checked before any weights load, as plain plan data."""

from __future__ import annotations

from .lora import LoraSpec, check_lora, parse_lora, unique_names


def check_adapters(req, unet_config: dict) -> dict:
    """{'loras': [...]} (only the kinds asked for): JSON-safe, what the run will load."""
    out: dict = {}
    cross = unet_config.get("cross_attention_dim")
    loras = [check_lora(parse_lora(text), cross) for text in (getattr(req, "loras", None) or ())]
    if loras:
        out["loras"] = [s.to_dict() for s in unique_names(loras)]
    return out


def lora_specs(adapters: dict) -> list[LoraSpec]:
    return [LoraSpec(**d) for d in (adapters or {}).get("loras", [])]


def describe(adapters: dict) -> list[str]:
    """One readable line per adapter (for --dry-run)."""
    lines = []
    for d in (adapters or {}).get("loras", []):
        lines.append(f"LoRA {d['name']} x{d['weight']:g} ({d['layout'] or 'hub'}: {d['source']})")
    return lines


def mount_adapters(pipe, adapters: dict | None) -> None:
    """Load what the plan names onto a pipeline whose LinFusion layers are already mounted."""
    from .lora import load_loras

    load_loras(pipe, lora_specs(adapters))
