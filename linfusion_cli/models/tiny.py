"""Tiny random Stable Diffusion pipelines built from config dicts (tests and `--model demo`).

They have the real families' structure (VAE scale factor 8, 4 latent channels, SD2's
v-prediction with 64-dim heads, SD-XL's two text encoders and size conditioning) at a size that
runs on a laptop CPU. They draw noise, not pictures.
"""

from __future__ import annotations

import tempfile
import json
from pathlib import Path

import torch

FAMILIES = ("sd15", "sd21", "sdxl")

# A CLIP byte-level BPE vocabulary with no merges: every character is a token.
_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: Path) -> Path:
    """Write a character-level CLIP tokenizer (vocab.json, merges.txt) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + _SPECIAL
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer"}))
    return folder


VOCAB_SIZE = 2 * 256 + 2

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=64, scaling_factor=0.18215,
)

UNET_CONFIGS = {
    "sd15": dict(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
    ),
    "sd21": dict(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128), norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(1, 2),
        use_linear_projection=True,
    ),
    "sdxl": dict(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
    ),
}

# `--model demo` is smaller still, so the whole 16K path runs on a laptop CPU in minutes: the
# same structure (two levels, cross-attention, VAE factor 8) with fewer channels.
DEMO_UNET_CONFIGS = {
    family: dict(config, block_out_channels=tuple(c // 2 for c in config["block_out_channels"]))
    for family, config in UNET_CONFIGS.items()
}
DEMO_VAE_CONFIG = dict(VAE_CONFIG, block_out_channels=(8, 16, 16, 16), norm_num_groups=4)

SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000,
)


def _text_config(projection: bool = False):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=VOCAB_SIZE - 2, eos_token_id=VOCAB_SIZE - 1, pad_token_id=VOCAB_SIZE - 1,
        hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=VOCAB_SIZE, max_position_embeddings=77,
        projection_dim=32 if projection else 512, hidden_act="gelu",
    )


def build_tiny_pipeline(family: str = "sd15", seed: int = 0, *, demo: bool = False,
                        tokenizer_dir: Path | None = None):
    """A tiny random diffusers pipeline of `family`, identical for the same seed."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(DEMO_UNET_CONFIGS if demo else UNET_CONFIGS)[family])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**(DEMO_VAE_CONFIG if demo else VAE_CONFIG))
    prediction = "v_prediction" if family == "sd21" else "epsilon"
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG, prediction_type=prediction)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = write_tokenizer(Path(tokenizer_dir or tmp) / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        torch.manual_seed(seed + 2)
        if family != "sdxl":
            text_encoder = CLIPTextModel(_text_config()).eval()
            return StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                scheduler=scheduler, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
        text_encoder = CLIPTextModel(_text_config()).eval()
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection=True)).eval()
        tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir)
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=True)


def save_tiny_pipeline(folder: Path, family: str = "sd15", seed: int = 0, *, demo: bool = False) -> Path:
    """Build a tiny pipeline and save it in the diffusers folder layout (`save_pretrained`)."""
    folder = Path(folder)
    build_tiny_pipeline(family, seed, demo=demo).save_pretrained(folder, safe_serialization=True)
    return folder


# `--preview-method taesd` with a demo model: a TAESD (diffusers' AutoencoderTiny) of the real one's
# structure (4 blocks, x8 upsampling, 4 latent channels) with 8 channels instead of 64.
DEMO_TAESD_CONFIG = dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                         num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)


def save_tiny_taesd(folder: Path, seed: int = 0, config: dict | None = None) -> Path:
    """A random AutoencoderTiny from `config` (default: the demo's), saved with save_pretrained."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    AutoencoderTiny(**(config or DEMO_TAESD_CONFIG)).save_pretrained(folder, safe_serialization=True)
    return Path(folder)
