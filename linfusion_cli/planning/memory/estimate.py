"""One stage's peak device memory, estimated from model configs so a plan is chosen before loading.

The activation working sets come from walking the diffusers UNet and VAE structure (walk.py,
where the assumptions are written down and checked against a trace of the real forward,
tracing/unet.py); this module adds the weights resident under each offload mode, the margin, and
their total per stage (stage_peak, the one place a total is formed).

* Weights stay resident per offload mode: "none" = UNet + VAE + text encoders, "model" = the
  model of the running phase, "sequential" = about two UNet layers, the VAE whole.
* Margin: the CUDA context (0.75 GiB, outside the allocator) plus OVERHEAD (20%) for allocator
  fragmentation and cuDNN conv workspaces, an allowance not yet calibrated on any GPU.
"""

from __future__ import annotations

import torch
import hashlib
import json
from functools import lru_cache

from ... import parallel
from ...figures import VAE_ATTN_TOKEN_LIMIT, device_kind
from .walk import Knobs, vae_activation_bytes
from .walk_bands import activation_bytes as unet_activation_bytes  # band-wise when band_rows
from .walk_bands import breakdown as unet_breakdown  # band-wise when band_rows

GIB = 1 << 30
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
# Allocator fragmentation and cuDNN conv workspaces, as a share of the peak: a conventional
# allowance, NOT calibrated (no GPU measurement exists yet; see benchmarks/gpu_16k.py).
OVERHEAD = 0.20
TEXT_ENCODER_PARAMS = {  # by the UNet's cross_attention_dim
    768: 123_060_480,  # CLIP ViT-L/14 text model (SD1.x)
    1024: 340_387_840,  # OpenCLIP ViT-H text model (SD2.x)
    2048: 123_060_480 + 694_659_840,  # CLIP-L + OpenCLIP bigG with projection (SD-XL)
}


# Parameter counts of the shipped configs (checked against meta instantiation in the tests), so
# a dry run needs no diffusers import. Keyed by _config_key; other configs are built on meta.
KNOWN_PARAMS = {
    "f4e28ff8dab15048": 859_520_964,  # sd15 unet
    "078262861abbe1cd": 83_653_863,  # sd15 vae
    "2b9fa27ae5ac1dd5": 865_910_724,  # sd21 unet
    "04794ace1109eac6": 83_653_863,  # sd21 vae
    "ce937fdbd29edc2c": 2_567_463_684,  # sdxl unet
    "eacf5c6c3b390b25": 83_653_863,  # sdxl vae
}


def _config_key(config: dict) -> str:
    """A digest of the architecture keys (those not starting with "_")."""
    arch = {k: v for k, v in config.items() if not k.startswith("_")}
    return hashlib.sha1(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


@lru_cache(maxsize=32)
def _param_count(kind: str, config_json: str) -> int:
    """Parameters of a diffusers model built on the meta device (no memory is allocated)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = UNet2DConditionModel if kind == "unet" else AutoencoderKL
    with torch.device("meta"):
        model = cls.from_config(json.loads(config_json))
    return sum(p.numel() for p in model.parameters())


def param_count(kind: str, config: dict, *, use_known: bool = True) -> int:
    """Parameter count of a "unet" or "vae" config, cached per config."""
    known = KNOWN_PARAMS.get(_config_key(config)) if use_known else None
    return known or _param_count(kind, json.dumps(config, sort_keys=True))


def text_encoder_params(unet_config: dict) -> int:
    """Parameters of the text encoder(s) that go with a UNet (by its cross-attention width)."""
    dim = unet_config.get("cross_attention_dim", 768)
    dim = dim[0] if isinstance(dim, (list, tuple)) else dim
    return TEXT_ENCODER_PARAMS.get(dim, param_count("unet", unet_config) // 7)


def vae_dtype_bytes(dtype_bytes: int, vae_bytes: int | None) -> int:
    """The VAE's bytes per value: as given, else the UNet's (bf16 beside a 16-bit UNet, see
    models.resolve.choose_dtypes; a GPU without bf16 runs it in fp32 and says vae_bytes=4)."""
    return dtype_bytes if vae_bytes is None else vae_bytes


def weight_bytes(unet_config: dict, vae_config: dict, dtype_bytes: int,
                 text_encoders_bytes: int | None = None, vae_bytes: int | None = None) -> dict[str, int]:
    """Bytes of each model's weights: unet, vae (maybe fp32), text encoders."""
    te = text_encoders_bytes
    if te is None:
        te = text_encoder_params(unet_config) * dtype_bytes
    return {"unet": param_count("unet", unet_config) * dtype_bytes,
            "vae": param_count("vae", vae_config) * vae_dtype_bytes(dtype_bytes, vae_bytes),
            "text": te}


def layer_bytes(unet_config: dict, dtype_bytes: int) -> int:
    """About two of the largest layers in flight under sequential offload (3x3 conv at C_max)."""
    c = max(unet_config["block_out_channels"])
    return 2 * 9 * c * c * dtype_bytes


DILATED_PASS_LATENTS = 4  # DemoFusion: clean latents, noise, first step's result, blurred input


def dilated_pass_bytes(unet_config: dict, *, latent_h: int, latent_w: int) -> int:
    """What a DemoFusion step holds beyond a plain one while its second (dilated) UNet pass runs:
    four fp32 latents. The pass itself runs after the first with the same activation shapes
    (dilation with scaled padding keeps every size), so its activations add nothing."""
    return DILATED_PASS_LATENTS * unet_config.get("in_channels", 4) * latent_h * latent_w * 4


HALO_ROWS = 2  # rows a rank holds beyond its band at the widest layer (a 3x3 conv's two halos)


def rank_latent_rows(unet_config: dict, latent_h: int, world_size: int) -> int:
    """Latent rows whose UNet activations one rank of `world_size` holds under band parallelism:
    the largest band of the layout (parallel/layout.py) plus halo rows."""
    if world_size <= 1:
        return latent_h
    levels = len(unet_config["down_block_types"]) - 1
    largest = max(b - a for a, b in parallel.bands(latent_h, levels, world_size)[0])
    return min(latent_h, largest + HALO_ROWS)


def gathered_bytes(unet_config: dict, *, latent_h: int, latent_w: int, dtype_bytes: int,
                   batch: int) -> int:
    """What band parallelism adds while the UNet runs: its whole output (B, 4, H, W), gathered
    from every rank, and the gather's per-rank buffers (about as much again)."""
    return 2 * batch * unet_config.get("out_channels", 4) * latent_h * latent_w * dtype_bytes


def estimate_peak_bytes(unet_config: dict, vae_config: dict, **kwargs) -> int:
    """Peak device bytes of one stage: max over its UNet and VAE phases of weights + activations
    + margin; the `total` of peak_breakdown (same keyword arguments)."""
    return peak_breakdown(unet_config, vae_config, **kwargs)["total"]


def _resident(weights: dict[str, int], offload: str, device: str,
              layer_bytes: int) -> tuple[int, int]:
    """Weight bytes on the device while the UNet runs and while the VAE runs."""
    if offload == "none" or device != "cuda":
        return sum(weights.values()), sum(weights.values())
    if offload == "model":  # accelerate keeps only the running model on the device
        return weights["unet"], weights["vae"]
    # sequential: each UNet layer's weights arrive just before it runs; the VAE moves whole
    # (pipeline.knobs._offload: the tiled VAE reads its GroupNorm weights directly)
    return layer_bytes, weights["vae"]


def stage_peak(weights: dict[str, int], unet_act: int, vae_act: int, *, offload: str,
               device: str, layer_bytes: int) -> int:
    """Resident weights (by offload mode) + the larger phase's activations + margin."""
    unet_w, vae_w = _resident(weights, offload, device, layer_bytes)
    peak = max(unet_w + unet_act, vae_w + vae_act)
    context = CUDA_CONTEXT_BYTES if device == "cuda" else 0
    return peak + int(peak * OVERHEAD) + context


def peak_breakdown(unet_config: dict, vae_config: dict, *, width: int, height: int,
                   dtype_bytes: int = 2, batch: int = 2, knobs: Knobs | None = None,
                   linfusion: bool = True, device: str = "cuda",
                   text_encoders_bytes: int | None = None, vae_bytes: int | None = None,
                   dilated_pass: bool = False) -> dict:
    """One stage's peak, itemised: the UNet's peak moment and every tensor alive there, the VAE
    phase, resident weights, the margin, and their `total` (bytes).

    batch is the UNet batch (2 with classifier-free guidance; cfg_split runs it as two of 1).
    """
    k = knobs or Knobs()
    w = weight_bytes(unet_config, vae_config, dtype_bytes, text_encoders_bytes, vae_bytes)
    lb = layer_bytes(unet_config, dtype_bytes)
    where, terms = unet_breakdown(unet_config, latent_h=-(-height // 8), latent_w=-(-width // 8),
                                  batch=batch, dtype_bytes=dtype_bytes, knobs=k,
                                  linfusion=linfusion)
    unet_act = unet_activation_bytes(unet_config, latent_h=-(-height // 8),
                                     latent_w=-(-width // 8), batch=batch,
                                     dtype_bytes=dtype_bytes, knobs=k, linfusion=linfusion)
    if dilated_pass:
        extra = dilated_pass_bytes(unet_config, latent_h=-(-height // 8), latent_w=-(-width // 8))
        terms = {**terms, "DemoFusion latents (dilated pass)": extra}
        unet_act += extra
    vae_act = vae_activation_bytes(vae_config, height=height, width=width, tile_px=k.vae_tile_px,
                                   dtype_bytes=vae_dtype_bytes(dtype_bytes, vae_bytes),
                                   band_rows=k.band_rows,
                                   token_limit=VAE_ATTN_TOKEN_LIMIT[device_kind(device)])
    unet_w, vae_w = _resident(w, k.offload, device, lb)
    peak = max(unet_w + unet_act, vae_w + vae_act)
    context = CUDA_CONTEXT_BYTES if device == "cuda" else 0
    return {"unet_moment": where, "unet_terms": terms, "unet_activations": unet_act,
            "unet_weights": unet_w, "vae_activations": vae_act, "vae_weights": vae_w,
            "phase": "unet" if unet_w + unet_act >= vae_w + vae_act else "vae",
            "margin": int(peak * OVERHEAD), "context": context,
            "total": stage_peak(w, unet_act, vae_act, offload=k.offload, device=device,
                                layer_bytes=lb)}


def format_breakdown(b: dict) -> str:
    """Lines of a peak_breakdown for a terminal, GiB."""
    g = lambda x: f"{x / GIB:6.2f} GiB"
    lines = [f"  total {g(b['total'])} (peak phase: {b['phase']})",
             (f"    UNet weights resident {g(b['unet_weights'])}; "
              f"VAE phase {g(b['vae_weights'] + b['vae_activations'])}"),
             f"    margin {OVERHEAD:.0%} {g(b['margin'])}; CUDA context {g(b['context'])}",
             f"    UNet activations {g(b['unet_activations'])} at {b['unet_moment']}:"]
    for name, v in sorted(b["unet_terms"].items(), key=lambda kv: -kv[1]):
        if v >= 0.005 * GIB:
            lines.append(f"      {g(v)}  {name}")
    return "\n".join(lines)
