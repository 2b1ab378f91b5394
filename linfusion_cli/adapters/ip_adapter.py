"""IP-Adapter: `--ip-adapter FILE|ID --ip-image FILE`, h94 layout, through diffusers' load_ip_adapter.

It adds image tokens to the cross-attention (attn2) only, so it leaves the LinFusion layers
(attn1) alone: diffusers lists and replaces the attention processors of the modules that have
them, and LinFusion layers have none.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointMismatchError, InputError, ModelNotFoundError
from .file_checks import family_of_cross_dim, is_local, loading_errors, require_file, safetensors_shapes
from ..bounds import check_config
from ..inputs import read_bounded
from ..io import images  # images.open_image: a seam tests watch
from .folder_weights import check_encoder_weights

# h94/IP-Adapter: the file per family, and its folder in the repo (image encoder beside it)
HUB_FILES = {"sd15": ("models", "ip-adapter_sd15.safetensors"),
             "sdxl": ("sdxl_models", "ip-adapter_sdxl.safetensors")}


def _encoder_config(folder: Path, what: str) -> dict:
    """The encoder's config.json: regular, small, a JSON object of bounded sizes."""

    config = folder / "config.json"
    if not config.exists():
        raise ModelNotFoundError(f"{what}: no image encoder at {folder} (a CLIP vision folder "
                                 "with config.json); pass --ip-encoder DIR")
    try:
        data = json.loads(read_bounded(config, f"{what}: encoder config"))
    except ValueError as exc:
        raise InputError(f"{what}: {config} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{what}: {config} must hold a JSON object")
    return check_config(data, f"{what}: {config}")


def check_ip_adapter(source: str, encoder: str | None, family: str, unet_config: dict,
                     allow_pickle: bool = False) -> dict:
    """The adapter file (h94 keys, cross-attention width of this model) and its image encoder."""
    cross = unet_config.get("cross_attention_dim")
    if not is_local(source):
        if source == "h94/IP-Adapter" and family not in HUB_FILES:
            raise CheckpointMismatchError(f"--ip-adapter: h94/IP-Adapter has no file for {family}")
        subfolder, weight = HUB_FILES.get(family, ("", None))
        out = {"source": source, "subfolder": subfolder, "weight_name": weight}
        return out | ({"encoder": str(Path(encoder).expanduser())} if encoder else {})
    path = require_file(source, "--ip-adapter")
    shapes = safetensors_shapes(path, "--ip-adapter")
    if not any(k.startswith("image_proj.") for k in shapes) or not any(k.startswith("ip_adapter.") for k in shapes):
        raise InputError(f"--ip-adapter: {path.name} is not in the h94 layout "
                         "(image_proj.* and ip_adapter.* keys)")
    empty = sorted(k for k, s in shapes.items() if 0 in s)
    if empty:  # a zero-token (or zero-width) projection: nothing for the cross-attention to attend
        raise CheckpointMismatchError(f"--ip-adapter: {path.name}: tensor {empty[0]} has shape "
                                      f"{list(shapes[empty[0]])} (no image tokens)")
    dims = {s[-1] for k, s in shapes.items() if k.endswith((".to_k_ip.weight", ".to_v_ip.weight"))}
    if cross is not None and dims and dims != {cross}:
        dim = dims.pop()
        raise CheckpointMismatchError(
            f"--ip-adapter: {path.name} is for {family_of_cross_dim(dim, cross)} "
            f"(cross-attention input {dim}); this model's is {cross}")
    encoder_dir = Path(encoder).expanduser() if encoder else path.parent / "image_encoder"
    config = _encoder_config(encoder_dir, "--ip-encoder" if encoder else "--ip-adapter")
    proj = shapes.get("image_proj.proj.weight")  # plain IP-Adapter: (tokens x cross, clip dim)
    if proj is not None and config.get("projection_dim") not in (None, proj[-1]):
        raise CheckpointMismatchError(
            f"--ip-adapter: {path.name} expects {proj[-1]}-dim image embeddings; the encoder at "
            f"{encoder_dir} gives {config.get('projection_dim')}")
    if proj is not None and cross and (proj[0] < cross or proj[0] % cross):
        raise CheckpointMismatchError(f"--ip-adapter: {path.name}: image_proj.proj.weight gives "
                                      f"{proj[0]} outputs, not a whole number of {cross}-wide tokens")

    fmt = check_encoder_weights(encoder_dir, "--ip-encoder" if encoder else "--ip-adapter", allow_pickle)
    return {"source": str(path), "encoder": str(encoder_dir)} | ({"encoder_format": "pickle"} if fmt == "pickle" else {})


def load_ip_adapter(pipe, spec) -> None:
    """Image encoder (if given locally) then the adapter; scale set on every attn2."""
    from transformers import CLIPVisionModelWithProjection

    with loading_errors("--ip-adapter", spec.source):
        encoder_folder = "image_encoder"
        if spec.encoder:
            encoder = CLIPVisionModelWithProjection.from_pretrained(  # .bin only with --allow-pickle
                spec.encoder, dtype=pipe.unet.dtype,
                use_safetensors=None if spec.encoder_format == "pickle" else True)
            pipe.register_modules(image_encoder=encoder)
            encoder_folder = None  # registered: diffusers skips its own encoder load
        source = Path(spec.source)
        if source.is_file():
            pipe.load_ip_adapter(str(source.parent), subfolder="", weight_name=source.name,
                                 image_encoder_folder=encoder_folder)
        else:
            pipe.load_ip_adapter(spec.source, subfolder=spec.subfolder or "",
                                 weight_name=spec.weight_name, image_encoder_folder=encoder_folder)
    pipe.set_ip_adapter_scale(spec.scale)


def stage_kwargs(ctx) -> dict:
    """The IP-Adapter image for every stage's pipeline call (encoded there, at the encoder's size)."""
    spec = ctx.plan.adapters.ip_adapter
    if spec is None:
        return {}

    if ctx.ip_image is None:
        ctx.ip_image = images.open_image(spec.image)
    return {"ip_adapter_image": ctx.ip_image}
