"""The adapters of a request, parsed and checked before any weights load, as plain plan data."""

from __future__ import annotations

from ..errors import PlanError
from .lora import LoraSpec, check_lora, parse_lora, unique_names
from .common import check_image
from .controlnet import check_controlnet, check_scale, load_controlnet
from .ip_adapter import check_ip_adapter, load_ip_adapter
from .lora import load_loras


def check_adapters(req, unet_config: dict, plan=None) -> dict:
    """{'loras': [...], 'controlnet': {...}, ...} (only the kinds asked for): JSON-safe."""
    out: dict = {}
    pickle = bool(getattr(req, "allow_pickle", False))
    cross = unet_config.get("cross_attention_dim")
    loras = [check_lora(parse_lora(text), cross, unet_config) for text in (getattr(req, "loras", None) or ())]
    if loras:
        out["loras"] = [s.to_dict() for s in unique_names(loras)]
    controlnet, image = getattr(req, "controlnet", None), getattr(req, "control_image", None)
    if (controlnet is None) != (image is None):
        raise PlanError("--controlnet and --control-image go together")
    if controlnet is None and getattr(req, "control_scale", None) is not None:
        raise PlanError("--control-scale needs --controlnet")
    if controlnet is not None:
        out["controlnet"] = (check_controlnet(controlnet, "--controlnet", unet_config, pickle)
                             | check_image(image, "--control-image")
                             | {"scale": check_scale(req.control_scale, "--control-scale")})
    tile = getattr(req, "tile_controlnet", None)
    if tile is None and getattr(req, "tile_scale", None) is not None:
        raise PlanError("--tile-scale needs --tile-controlnet")
    if tile is not None:
        if plan is not None and all(s.strength is None for s in plan.stages):
            raise PlanError("--tile-controlnet acts on img2img stages; this plan has none")
        out["tile_controlnet"] = (check_controlnet(tile, "--tile-controlnet", unet_config, pickle)
                                  | {"scale": check_scale(req.tile_scale, "--tile-scale")})
    ip, ip_image = getattr(req, "ip_adapter", None), getattr(req, "ip_image", None)
    if (ip is None) != (ip_image is None):
        raise PlanError("--ip-adapter and --ip-image go together")
    if ip is None and (getattr(req, "ip_scale", None) is not None or getattr(req, "ip_encoder", None)):
        raise PlanError("--ip-scale and --ip-encoder need --ip-adapter")
    if ip is not None:

        family = plan.family if plan is not None else None
        out["ip_adapter"] = (check_ip_adapter(ip, req.ip_encoder, family, unet_config, pickle)
                             | check_image(ip_image, "--ip-image")
                             | {"scale": check_scale(req.ip_scale, "--ip-scale")})
    return out


def lora_specs(adapters: dict) -> list[LoraSpec]:
    return [LoraSpec(**d) for d in (adapters or {}).get("loras", [])]


def describe(adapters: dict) -> list[str]:
    """One readable line per adapter (for --dry-run)."""
    lines = []
    for d in (adapters or {}).get("loras", []):
        lines.append(f"LoRA {d['name']} x{d['weight']:g} ({d['layout'] or 'hub'}: {d['source']})")
    if "controlnet" in (adapters or {}):
        d = adapters["controlnet"]
        lines.append(f"ControlNet {d['source']} x{d['scale']:g}, control image {d['image']} "
                     "(resized to every stage)")
    if "tile_controlnet" in (adapters or {}):
        d = adapters["tile_controlnet"]
        lines.append(f"tile ControlNet {d['source']} x{d['scale']:g} (img2img stages: their own input)")
    if "ip_adapter" in (adapters or {}):
        d = adapters["ip_adapter"]
        lines.append(f"IP-Adapter {d['source']} x{d['scale']:g}, image {d['image']}")
    return lines


def mount_adapters(pipe, adapters: dict | None, device=None) -> dict:
    """Load what the plan names onto a pipeline whose LinFusion layers are already mounted.

    Returns the loaded ControlNets by kind ({'controlnet': ..., 'tile_controlnet': ...}).
    """

    adapters = adapters or {}
    load_loras(pipe, lora_specs(adapters))
    if "ip_adapter" in adapters:
        load_ip_adapter(pipe, adapters["ip_adapter"])
    nets = {}
    for kind in ("controlnet", "tile_controlnet"):
        if kind in adapters:
            nets[kind] = load_controlnet(adapters[kind]["source"], pipe.unet, "--" + kind.replace("_", "-"),
                                         pickle_ok=adapters[kind].get("format") == "pickle")
            if device is not None:
                nets[kind].to(device)
    return nets
