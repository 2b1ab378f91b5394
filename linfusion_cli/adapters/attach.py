"""The adapters of a request, parsed and checked before any weights load, as typed plan specs."""

from __future__ import annotations

from dataclasses import replace

from ..errors import PlanError
from .lora import check_lora, parse_lora, unique_names
from .file_checks import check_image
from .controlnet import check_controlnet, check_scale, load_controlnet
from .ip_adapter import check_ip_adapter, load_ip_adapter
from .lora import load_loras
from .specs import CONTROLNET_KINDS, AdapterSpecs, IpAdapterSpec


def check_adapters(req, unet_config: dict, plan=None) -> AdapterSpecs:
    """The adapters a request (planning.request.Request) asks for, each checked against the
    model's UNet config."""
    pickle = bool(req.allow_pickle)
    cross = unet_config.get("cross_attention_dim")
    loras = [check_lora(parse_lora(text), cross, unet_config) for text in req.loras or ()]
    specs = AdapterSpecs(loras=tuple(unique_names(loras)))
    controlnet, image = req.controlnet, req.control_image
    if (controlnet is None) != (image is None):
        raise PlanError("--controlnet and --control-image go together")
    if controlnet is None and req.control_scale is not None:
        raise PlanError("--control-scale needs --controlnet")
    if controlnet is not None:
        spec = check_controlnet(controlnet, "--controlnet", unet_config, pickle)
        shown = check_image(image, "--control-image")
        specs = replace(specs, controlnet=replace(spec, image=shown["image"], image_size=tuple(shown["image_size"]),
                                                  scale=check_scale(req.control_scale, "--control-scale")))
    tile = req.tile_controlnet
    if tile is None and req.tile_scale is not None:
        raise PlanError("--tile-scale needs --tile-controlnet")
    if tile is not None:
        specs = replace(specs, tile_controlnet=replace(
            check_controlnet(tile, "--tile-controlnet", unet_config, pickle),
            scale=check_scale(req.tile_scale, "--tile-scale")))
    ip, ip_image = req.ip_adapter, req.ip_image
    if (ip is None) != (ip_image is None):
        raise PlanError("--ip-adapter and --ip-image go together")
    if ip is None and (req.ip_scale is not None or req.ip_encoder):
        raise PlanError("--ip-scale and --ip-encoder need --ip-adapter")
    if ip is not None:

        family = plan.family if plan is not None else None
        found = check_ip_adapter(ip, req.ip_encoder, family, unet_config, pickle)
        shown = check_image(ip_image, "--ip-image")
        specs = replace(specs, ip_adapter=IpAdapterSpec(
            **found, image=shown["image"], image_size=tuple(shown["image_size"]),
            scale=check_scale(req.ip_scale, "--ip-scale"), hub="subfolder" in found))
    return specs


def describe(adapters: AdapterSpecs) -> list[str]:
    """One readable line per adapter (for --dry-run)."""
    lines = [f"LoRA {s.name} x{s.weight:g} ({s.layout or 'hub'}: {s.source})" for s in adapters.loras]
    if adapters.controlnet is not None:
        d = adapters.controlnet
        lines.append(f"ControlNet {d.source} x{d.scale:g}, control image {d.image} "
                     "(resized to every stage)")
    if adapters.tile_controlnet is not None:
        d = adapters.tile_controlnet
        lines.append(f"tile ControlNet {d.source} x{d.scale:g} (img2img stages: their own input)")
    if adapters.ip_adapter is not None:
        d = adapters.ip_adapter
        lines.append(f"IP-Adapter {d.source} x{d.scale:g}, image {d.image}")
    return lines


def mount_adapters(pipe, adapters: AdapterSpecs | None, device=None) -> dict:
    """Load what the plan names onto a pipeline whose LinFusion layers are already mounted.

    Returns the loaded ControlNets by kind ({'controlnet': ..., 'tile_controlnet': ...}).
    """

    adapters = adapters or AdapterSpecs()
    load_loras(pipe, list(adapters.loras))
    if adapters.ip_adapter is not None:
        load_ip_adapter(pipe, adapters.ip_adapter)
    nets = {}
    for kind in CONTROLNET_KINDS:
        spec = getattr(adapters, kind)
        if spec is not None:
            nets[kind] = load_controlnet(spec.source, pipe.unet, "--" + kind.replace("_", "-"),
                                         pickle_ok=spec.format == "pickle", config=spec.config)
            if device is not None:
                nets[kind].to(device)
    return nets
