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
    units = []
    if "controlnet" in adapters:
        units.append(("none", adapters["controlnet"]))
    if "tile_controlnet" in adapters:
        units.append(("tile (each stage's input)", adapters["tile_controlnet"]))
    for i, (module, d) in enumerate(units):
        # the sd-webui-controlnet unit text: "Module: ..., Model: ..., Weight: ..."
        fields[f"ControlNet {i}"] = f"Module: {module}, Model: {_model(d)}, Weight: {d['scale']:g}"
    if "ip_adapter" in adapters:
        d = adapters["ip_adapter"]
        fields["IP-Adapter"] = f"Model: {_name(d['source'])}, Weight: {d['scale']:g}"
    return fields


def _name(source: str) -> str:
    return source.rstrip("/").rsplit("/", 1)[-1] or source


def _model(d: dict) -> str:
    """A ControlNet's model name: a single file's without its suffix (as the A1111 extension)."""
    name = _name(d["source"])
    return name.rsplit(".", 1)[0] if d.get("format") else name
