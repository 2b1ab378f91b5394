"""Tiny random UNets and their inputs, built from config dicts (imported by tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class Pipe:
    """The components pipeline/knobs.py's apply_memory_plan and read_knobs take (a diffusers
    pipeline has more; the text encoders are optional there)."""

    unet: nn.Module
    vae: nn.Module
    scheduler: object = None


def tiny_unet(family: str = "sd15", seed: int = 0):
    """A tiny random UNet2DConditionModel of the family's shape."""
    from diffusers import UNet2DConditionModel

    from linfusion_cli.models.tiny import UNET_CONFIGS

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIGS[family]).eval()


def linfusion_unet(family: str = "sd15"):
    """A tiny UNet with LinFusion layers whose nonlinear projections are not zero."""
    from linfusion_cli.attention import apply_linfusion

    unet = tiny_unet(family)
    apply_linfusion(unet)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in unet.modules():
            if hasattr(m, "to_q_"):
                for p in list(m.to_q_.parameters()) + list(m.to_k_.parameters()):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return unet


def unet_inputs(unet, height: int = 16, width: int = 16, batch: int = 2, seed: int = 1):
    """Random (sample, timestep, context, added_cond_kwargs) for a UNet forward."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    sample = torch.randn(batch, cfg.in_channels, height, width, generator=g)
    context = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, text_dim, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)}
    return sample, torch.tensor(500), context, kwargs


def tiny_vae():
    """The demo model's VAE architecture, random weights (seed 0), for the tiled-VAE tests."""
    from diffusers import AutoencoderKL

    from linfusion_cli.models.tiny import VAE_CONFIG

    torch.manual_seed(0)
    return AutoencoderKL(**VAE_CONFIG).eval()


def save_taesd(folder: Path, **config) -> Path:
    """A tiny AutoencoderTiny from a config dict, saved as a download is: save_pretrained."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    settings = dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)
    AutoencoderTiny(**{**settings, **config}).save_pretrained(folder, safe_serialization=True)
    return folder


def module_state(model) -> dict:
    """What could carry state on each submodule of model, by name: its public attribute names
    (torch's and accelerate's own are underscored; a patched forward is left out), the public
    attributes of a patched forward function, and how many forward hooks it has. The class's own
    forward bound on the instance (what accelerate's hook removal leaves) counts as no patch."""
    state = {}
    for name, module in model.named_modules():
        forward = module.__dict__.get("forward")
        if getattr(forward, "__func__", None) is type(module).forward:  # a bound method, or not
            forward = None
        state[name] = {"public": sorted(k for k in vars(module) if not k.startswith("_") and k != "forward"),
                       "forward": None if forward is None else sorted(
                           k for k in getattr(forward, "__dict__", {}) if not k.startswith("_")),
                       "hooks": (len(module._forward_hooks), len(module._forward_pre_hooks))}
    return state


def bare_model(*, device: str = "cpu", dtype=torch.float32, vae_dtype=None, family: str = "sd15"):
    """A models.loading.LoadedModel with no real components (an Identity UNet and VAE, DDIM), for
    tests of the code around the stages."""
    from diffusers import DDIMScheduler

    from linfusion_cli.models.loading import LoadedModel

    pipe = Pipe(nn.Identity(), nn.Identity(), DDIMScheduler())
    return LoadedModel(pipe=pipe, model="m", family=family, device=torch.device(device), dtype=dtype,
                       vae_dtype=dtype if vae_dtype is None else vae_dtype)


def bare_context(monkeypatch, plan, model, **fields):
    """A pipeline.context.StageContext over `model` that makes no diffusers pipelines."""
    from linfusion_cli.pipeline.context import StageContext

    monkeypatch.setattr(StageContext, "__post_init__", lambda self: None)
    return StageContext(plan=plan, model=model, on_event=lambda event: None, **fields)


@dataclass(frozen=True)
class CudaProperties:
    """What torch.cuda.get_device_properties returns that the package reads, for tests that
    stand in for a GPU on the CPU."""

    name: str = "NVIDIA H100 80GB HBM3"
    total_memory: int = 80 * 2 ** 30
