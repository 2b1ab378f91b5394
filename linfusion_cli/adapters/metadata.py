"""A1111-readable text for the adapters of a run (`<lora:name:w>`, `Lora hashes`, ...)."""

from __future__ import annotations


def prompt_tags(adapters: dict) -> str:
    """' <lora:name:w>' per LoRA, as A1111 writes them into the prompt text."""
    return "".join(f" <lora:{d['name']}:{d['weight']:g}>" for d in (adapters or {}).get("loras", []))


def a1111_fields(adapters: dict) -> dict:
    """Extra `parameters` fields: 'Lora hashes' (name: AutoV2 hash)."""
    fields = {}
    loras = (adapters or {}).get("loras", [])
    hashed = [f"{d['name']}: {d['hash']}" for d in loras if d.get("hash")]
    if hashed:
        fields["Lora hashes"] = ", ".join(hashed)
    return fields
