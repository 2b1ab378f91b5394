"""Shared fixtures: tiny random models built from config dicts, saved and loaded back."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def tiny_unet(family: str = "sd15", seed: int = 0):
    """A tiny random UNet2DConditionModel of the family's shape."""
    from diffusers import UNet2DConditionModel

    from linfusion_cli.models.tiny import UNET_CONFIGS

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIGS[family]).eval()


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


@pytest.fixture(scope="session")
def tiny_pipeline_dirs(tmp_path_factory):
    """The three tiny families saved with save_pretrained, built once per test session."""
    from linfusion_cli.models.tiny import FAMILIES, save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny_pipeline(root / family, family) for family in FAMILIES}
