"""Write a diffusers pipeline as one checkpoint in the ORIGINAL Stable Diffusion key layout.

The layout A1111 / ComfyUI / civitai single files use (CompVis `ldm` / Stability `sgm` names):

    model.diffusion_model.*        UNet   (input_blocks / middle_block / output_blocks)
    first_stage_model.*            VAE    (encoder.down.N.block.M / decoder.up.N / mid.attn_1)
    cond_stage_model.transformer.text_model.*          SD1.x CLIP ViT-L text encoder
    cond_stage_model.model.*                           SD2.x OpenCLIP ViT-H (fused in_proj)
    conditioner.embedders.0.transformer.text_model.*   SD-XL CLIP ViT-L text encoder
    conditioner.embedders.1.model.*                    SD-XL OpenCLIP bigG (fused in_proj)

It is the exact inverse of diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint` and `convert_open_clip_checkpoint` (loaders/single_file_utils.py),
with every block index derived from the model configs (number of levels, layers_per_block,
attention or not per level), so it works for any depth, not only the real 4-level models.
SD2.x: real files hold 24 OpenCLIP layers and diffusers' reader drops the 24th by a hard-coded
name (the pipeline uses the penultimate layer); here every layer of the diffusers encoder is
written, and the file carries no `text_projection` (diffusers' SD2 encoder has none).
"""

from __future__ import annotations

from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."

_UNET_RESNET = {  # diffusers ResnetBlock2D -> ldm ResBlock
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
    "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}
_VAE_TOP = {
    "encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _split(key: str, n: int) -> tuple[list[str], str]:
    parts = key.split(".")
    return parts[:n], ".".join(parts[n:])


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel state dict -> `input_blocks` / `middle_block` / `output_blocks` keys."""
    cfg = unet.config
    lpb = cfg.layers_per_block
    if not isinstance(lpb, int):
        raise TypeError("per-level layers_per_block has no single LDM numbering")
    # ldm numbering: input_blocks.0 is conv_in; each level has lpb (resnet[, attention]) blocks
    # then one downsampler block (not on the last level); output_blocks have lpb + 1 per level,
    # the upsampler riding on the last one (index 1 without attention, 2 with).
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        value = value.detach().clone()
        head, param = key.rsplit(".", 1)
        if head in _UNET_TOP:
            out[f"{_UNET_TOP[head]}.{param}"] = value
            continue
        parts = key.split(".")
        if parts[0] == "down_blocks":
            level, kind, idx = int(parts[1]), parts[2], int(parts[3])
            rest = ".".join(parts[4:])
            if kind == "downsamplers":  # down_blocks.L.downsamplers.0.conv.* -> input_blocks.N.0.op.*
                n = 1 + level * (lpb + 1) + lpb
                out[f"input_blocks.{n}.0.op.{rest.split('.', 1)[1]}"] = value
                continue
            n = 1 + level * (lpb + 1) + idx
            if kind == "resnets":
                out[f"input_blocks.{n}.0.{_resnet(rest)}"] = value
            elif kind == "attentions":
                out[f"input_blocks.{n}.1.{rest}"] = value
            else:
                raise KeyError(key)
        elif parts[0] == "up_blocks":
            level, kind, idx = int(parts[1]), parts[2], int(parts[3])
            rest = ".".join(parts[4:])
            if kind == "upsamplers":  # -> output_blocks.N.{1|2}.conv.*
                n = level * (lpb + 1) + lpb
                has_attn = hasattr(unet.up_blocks[level], "attentions") and unet.up_blocks[level].attentions
                slot = 2 if has_attn else 1
                out[f"output_blocks.{n}.{slot}.{rest}"] = value
                continue
            n = level * (lpb + 1) + idx
            if kind == "resnets":
                out[f"output_blocks.{n}.0.{_resnet(rest)}"] = value
            elif kind == "attentions":
                out[f"output_blocks.{n}.1.{rest}"] = value
            else:
                raise KeyError(key)
        elif parts[0] == "mid_block":
            kind, idx, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":  # resnets.0 -> middle_block.0, resnets.1 -> middle_block.2
                out[f"middle_block.{2 * idx}.{_resnet(rest)}"] = value
            elif kind == "attentions":
                out[f"middle_block.{2 * idx + 1}.{rest}"] = value
            else:
                raise KeyError(key)
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
    return {UNET_PREFIX + k: v for k, v in out.items()}


def _resnet(rest: str) -> str:
    layer, param = rest.rsplit(".", 1)
    return f"{_UNET_RESNET[layer]}.{param}"


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """AutoencoderKL state dict -> `encoder.down.N.block.M` / `decoder.up.N` / `mid.attn_1` keys.

    The mid-block attention projections are stored as 1x1 convolutions (out, in, 1, 1).
    """
    n_up = len(vae.config.up_block_types)
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        value = value.detach().clone()
        head, param = key.rsplit(".", 1)
        parts = key.split(".")
        if head in _VAE_TOP:
            new = f"{_VAE_TOP[head]}.{param}"
        elif parts[1] == "down_blocks":  # encoder.down_blocks.L.{resnets.M|downsamplers.0}.*
            level, kind = int(parts[2]), parts[3]
            rest = ".".join(parts[5:])
            if kind == "resnets":
                new = f"encoder.down.{level}.block.{parts[4]}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                new = f"encoder.down.{level}.downsample.{rest}"
        elif parts[1] == "up_blocks":  # decoder.up_blocks.i -> decoder.up.(n-1-i)
            level, kind = n_up - 1 - int(parts[2]), parts[3]
            rest = ".".join(parts[5:])
            if kind == "resnets":
                new = f"decoder.up.{level}.block.{parts[4]}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                new = f"decoder.up.{level}.upsample.{rest}"
        elif parts[1] == "mid_block":
            side, kind, idx = parts[0], parts[2], int(parts[3])
            rest = ".".join(parts[4:])
            if kind == "resnets":
                new = f"{side}.mid.block_{idx + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                layer, p = rest.rsplit(".", 1)
                new = f"{side}.mid.attn_1.{_VAE_ATTN[layer]}.{p}"
                if p == "weight" and layer != "group_norm":
                    value = value[:, :, None, None].contiguous()  # linear -> 1x1 conv
        else:  # conv_in/out, quant_conv, post_quant_conv: same names
            new = key
        out[new] = value
    return {VAE_PREFIX + k: v for k, v in out.items()}


def _text_model_keys(text_encoder) -> dict[str, torch.Tensor]:
    """CLIP text weights named `text_model.*` (transformers >= 5.6 flattened CLIPTextModel)."""
    sd = {}
    for key, value in text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        sd[key] = value.detach().clone()
    return sd


def clip_to_ldm(text_encoder, prefix: str = SD1_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """HF CLIPTextModel -> `<prefix>text_model.*` (the HF layout kept under a prefix)."""
    return {prefix + k: v for k, v in _text_model_keys(text_encoder).items()}


_OPENCLIP_LAYER = [  # diffusers piece -> open_clip piece, inside one encoder layer
    ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"),
]


def open_clip_to_ldm(text_encoder, prefix: str = SDXL_OPENCLIP_PREFIX) -> dict[str, torch.Tensor]:
    """HF CLIPTextModel[WithProjection] -> open_clip names: fused `attn.in_proj_*`, `resblocks.N`,
    `positional_embedding`, `ln_final`, and `text_projection` as (hidden, proj) = weight.T."""
    sd = _text_model_keys(text_encoder)
    out: dict[str, torch.Tensor] = {
        "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
        "token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
        "ln_final.weight": sd.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": sd.pop("text_model.final_layer_norm.bias"),
    }
    if "text_projection.weight" in sd:  # SD-XL's bigG; SD2's encoder has none in diffusers
        out["text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        src = f"text_model.encoder.layers.{i}."
        dst = f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{p}"] = torch.cat(
                [sd.pop(f"{src}self_attn.{q}_proj.{p}") for q in "qkv"], dim=0).contiguous()
            for hf, oc in _OPENCLIP_LAYER:
                out[f"{dst}{oc}.{p}"] = sd.pop(f"{src}{hf}.{p}")
    if sd:
        raise KeyError(f"no open_clip name for {sorted(sd)}")
    return {prefix + k: v for k, v in out.items()}


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """The whole pipeline as one LDM-layout state dict (SD1.x or SD-XL)."""
    sd = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    if getattr(pipe, "text_encoder_2", None) is not None:  # SD-XL (sgm `conditioner` layout)
        sd.update(clip_to_ldm(pipe.text_encoder, SDXL_CLIP_PREFIX))
        sd.update(open_clip_to_ldm(pipe.text_encoder_2))
    elif getattr(pipe.text_encoder, "text_projection", None) is None and (
            pipe.unet.config.use_linear_projection or pipe.unet.config.cross_attention_dim == 1024):
        sd.update(open_clip_to_ldm(pipe.text_encoder, SD2_OPENCLIP_PREFIX))  # SD2.x
    else:
        sd.update(clip_to_ldm(pipe.text_encoder))
    return sd


def save_ldm_checkpoint(pipe, path: Path) -> Path:
    """Write `pipeline_to_ldm(pipe)` as a .safetensors single file."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in pipeline_to_ldm(pipe).items()}, str(path))
    return Path(path)


CONTROLNET_PREFIX = "control_model."


def controlnet_to_ldm(controlnet) -> dict[str, torch.Tensor]:
    """ControlNetModel state dict -> the lllyasviel / A1111 single-file layout (`control_model.*`).

    The inverse of diffusers' `convert_controlnet_checkpoint`: the UNet-shaped part (time
    embedding, conv_in, down and middle blocks) is numbered as the LDM UNet's input_blocks /
    middle_block; `controlnet_down_blocks.i` -> `zero_convs.i.0`, `controlnet_mid_block` ->
    `middle_block_out.0`, the conditioning embedding's conv_in -> `input_hint_block.0`, its
    blocks.j -> `input_hint_block.{2j+2}` (SiLUs between them hold no weights), conv_out ->
    `input_hint_block.14` (the converter's fixed index: 4-entry embeddings only). SD-XL's
    `add_embedding` is `label_emb.0.{0,2}` as in the UNet (the converter itself does not read it;
    adapters/controlnet_file.py maps it by diffusers' table).
    """
    from types import SimpleNamespace

    state = {k: v.detach().clone() for k, v in controlnet.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    shared = {}
    for key, value in state.items():
        head, param = key.rsplit(".", 1)
        parts = key.split(".")
        if parts[0] == "controlnet_down_blocks":
            out[f"zero_convs.{parts[1]}.0.{param}"] = value
        elif head == "controlnet_mid_block":
            out[f"middle_block_out.0.{param}"] = value
        elif head == "controlnet_cond_embedding.conv_in":
            out[f"input_hint_block.0.{param}"] = value
        elif head == "controlnet_cond_embedding.conv_out":
            out[f"input_hint_block.14.{param}"] = value
        elif parts[:2] == ["controlnet_cond_embedding", "blocks"]:
            out[f"input_hint_block.{2 * int(parts[2]) + 2}.{param}"] = value
        else:
            shared[key] = value
    unet_like = SimpleNamespace(config=controlnet.config, state_dict=lambda: shared)
    for key, value in unet_to_ldm(unet_like).items():
        out[key[len(UNET_PREFIX):]] = value
    return {CONTROLNET_PREFIX + k: v for k, v in out.items()}
