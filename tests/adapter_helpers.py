"""Tiny random adapters (LoRA, ControlNet, IP-Adapter) for the tiny models, saved in the official
formats so tests load them through the code a user's download goes through."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


def tiny_lora_tensors(unet, rank: int = 2, seed: int = 0, scale: float = 0.3) -> dict:
    """{module name: (down (r, in), up (out, r))} for every attention projection of `unet`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS):
            down = torch.randn(rank, module.in_features, generator=g) * scale
            up = torch.randn(module.out_features, rank, generator=g) * scale
            out[name] = (down, up)
    return out


def save_tiny_lora(path: Path, unet, layout: str = "peft", rank: int = 2, seed: int = 0) -> Path:
    """The same random LoRA in kohya (lora_unet_*, alpha = rank) or peft (unet.*.lora_A/B) keys."""
    tensors = {}
    for name, (down, up) in tiny_lora_tensors(unet, rank, seed).items():
        if layout == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
        elif layout == "peft":
            tensors[f"unet.{name}.lora_A.weight"] = down
            tensors[f"unet.{name}.lora_B.weight"] = up
        else:
            raise ValueError(f"unknown LoRA layout {layout!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def save_tiny_controlnet(folder: Path, unet, seed: int = 0, scale: float = 0.2) -> Path:
    """ControlNetModel.from_unet(unet) with its zero-initialised outputs made random, so it acts."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    g = torch.Generator().manual_seed(seed)
    zero = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block,
            *controlnet.controlnet_down_blocks]
    with torch.no_grad():
        for conv in zero:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * scale)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * scale)
    controlnet.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def save_tiny_ip_adapter(folder: Path, unet, seed: int = 0, tokens: int = 4, scale: float = 0.5) -> Path:
    """An IP-Adapter in the h94 layout for `unet`: folder/ip-adapter.safetensors (image_proj.*,
    ip_adapter.{i}.to_k_ip/to_v_ip per cross-attention, i its index among all attention
    processors) and folder/image_encoder (a tiny CLIPVisionModelWithProjection)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=32,
                              num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    CLIPVisionModelWithProjection(config).eval().save_pretrained(folder / "image_encoder")
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    tensors = {"image_proj.proj.weight": torch.randn(cross * tokens, 32, generator=g) * scale,
               "image_proj.proj.bias": torch.randn(cross * tokens, generator=g) * scale,
               "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    for i, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name.rsplit(".", 1)[0])
            for kind in ("to_k_ip", "to_v_ip"):
                tensors[f"ip_adapter.{i}.{kind}.weight"] = \
                    torch.randn(attn.to_k.out_features, cross, generator=g) * scale
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "ip-adapter.safetensors"))
    return folder / "ip-adapter.safetensors"
