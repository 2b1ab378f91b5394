"""Config-driven estimate of one stage's peak device memory, so a plan is chosen before loading.

The model walks the diffusers UNet and VAE structure named by their `config.json` and keeps a
running count of the tensors alive at each op: the skip tensors the UNet holds for its up path,
the block input its caller keeps referenced, and the op's own temporaries. Counts are in
"channels per token" and are multiplied by tokens x batch x bytes at the end. Assumptions
(documented so they can be checked against measurements, see tests/test_memory_planner.py):

* ResNet: GroupNorm and SiLU each produce a new tensor (SiLU in place with `inplace`); the block
  input stays alive until the block returns; the shortcut conv adds one output-sized tensor.
* Transformer block, per token: the Transformer2D input, the block input x, LayerNorm output,
  then the largest of: LinFusion self-attention (q, k, v, the attention output, the merged heads
  and W_o's output: 6C, plus fp32 chunk temporaries of `attn_chunk` tokens, the d x d state being
  negligible), cross-attention through SDPA (q, out, a reshape copy: 3C; 77 context tokens), the
  GEGLU feed-forward (projection 8C, GELU(gate) 4C, product 4C: 16C; `ff_chunk` tokens at a time
  when chunked). Quadratic self-attention is modelled as SDPA memory-efficient (no N x N tensor).
* The VAE decoder (and encoder) is walked the same way on one tile with its context padding
  (88 px a side for decode, 32 for encode) or on the whole image when untiled; its mid-block
  attention is SDPA memory-efficient (O(N)). The VAE runs in fp32 when its config has
  `force_upcast` and the model dtype is 16-bit.
* Weights stay resident per offload mode: "none" = UNet + VAE + text encoders, "model" = the
  model of the running phase, "sequential" = about two layers.
* Margin: the CUDA context (0.75 GiB, outside the allocator) plus 20% for allocator
  fragmentation and cuDNN conv workspaces (fits the LinFusion paper's SD1.5 figures best).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache

GIB = 1 << 30
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
OVERHEAD = 0.20  # allocator fragmentation and cuDNN conv workspaces, as a share of the peak
DECODE_PAD_PX = 88  # 11 latent px of context on each side of a decoder tile
ENCODE_PAD_PX = 32
LINFUSION_DEFAULT_CHUNK = 1 << 16  # attention/ops.py DEFAULT_CHUNK: used when attn_chunk is 0
TEXT_ENCODER_PARAMS = {  # by the UNet's cross_attention_dim
    768: 123_060_480,  # CLIP ViT-L/14 text model (SD1.x)
    1024: 340_387_840,  # OpenCLIP ViT-H text model (SD2.x)
    2048: 123_060_480 + 694_659_840,  # CLIP-L + OpenCLIP bigG with projection (SD-XL)
}


@dataclass(frozen=True)
class Knobs:
    """The memory knobs the estimate depends on (a MemoryPlan without its estimate)."""

    offload: str = "none"
    vae_tile_px: int = 0
    ff_chunk: int = 0
    cfg_split: bool = False
    attn_chunk: int = 0
    inplace: bool = False
    skips_on_cpu: bool = False


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
    import torch
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


def vae_dtype_bytes(vae_config: dict, dtype_bytes: int) -> int:
    """fp16 VAEs with `force_upcast` (SD-XL) overflow at large sizes and run in fp32."""
    return 4 if vae_config.get("force_upcast", False) and dtype_bytes < 4 else dtype_bytes


# ---------------------------------------------------------------- working sets (channels/token)

def _resnet(cin: int, cout: int, inplace: bool) -> int:
    """Peak of a ResnetBlock2D including its input (held by the caller), channels/token.

    Moments: norm1 + SiLU (3 cin, 2 in place); conv1 (input, SiLU out, conv out); norm2 + SiLU;
    the residual sum and its division by output_scale_factor (shortcut, conv2, sum, quotient).
    """
    act1 = max(2 * cin + (0 if inplace else cin), 2 * cin + cout)
    act2 = cin + 2 * cout + (0 if inplace else cout)
    out = cin + (4 if cin != cout else 3) * cout
    return max(act1, act2, out)


def _transformer(c: int, n: int, k: Knobs, linfusion: bool, bytes_: int, mid: int | None) -> float:
    """Peak of a Transformer2DModel beyond its input (which the caller holds), channels/token."""
    chunk = k.attn_chunk or LINFUSION_DEFAULT_CHUNK
    if linfusion:  # 6C of tensors + fp32 chunk temporaries (k_c, v_c, q_c, numerator), 4 bytes each
        m = mid or c
        self_attn = max(6 * c, 3 * c + 2 * m) + 4 * c * min(n, chunk) / n * 4 / bytes_
    else:
        self_attn = 5 * c
    ff = 16 * c if not k.ff_chunk else 2 * c + 16 * c * min(n, k.ff_chunk) / n
    block = c + c + max(self_attn, 3 * c, ff)  # x, norm out, the largest sub-layer
    return c + max(block, 2 * c)  # the inner hidden (B, N, C), proj_in/proj_out temporaries


def _levels(h: int, w: int, depth: int) -> list[int]:
    """Tokens per resolution level for a (h, w) latent: stride-2 convs round up."""
    out = []
    for _ in range(depth):
        out.append(h * w)
        h, w = (h + 1) // 2, (w + 1) // 2
    return out


def unet_activation_bytes(cfg: dict, *, latent_h: int, latent_w: int, batch: int,
                          dtype_bytes: int, knobs: Knobs, linfusion: bool = True,
                          mid_dim: int | None = None) -> int:
    """Peak activation bytes of one UNet forward, walking the down, mid and up paths."""
    chans = list(cfg["block_out_channels"])
    depth = len(chans)
    n_tok = _levels(latent_h, latent_w, depth)
    layers = cfg.get("layers_per_block", 2)
    down_types, up_types = cfg["down_block_types"], cfg["up_block_types"]
    b = 1 if knobs.cfg_split else batch

    def tr(c, lvl):
        return _transformer(c, n_tok[lvl], knobs, linfusion, dtype_bytes, mid_dim) * n_tok[lvl]

    peak = 0.0
    skips: list[float] = [chans[0] * n_tok[0]]  # conv_in output, (element count per batch item)
    # down path: held = skips so far (or only this block's on the device when skips_on_cpu)
    for i, btype in enumerate(down_types):
        block_skips: list[float] = []
        cin = chans[i - 1] if i else chans[0]
        # the block input is the last skip; with skips on the CPU it is a device copy
        held_before = cin * n_tok[i] if knobs.skips_on_cpu else sum(skips)
        for _ in range(layers):
            held = held_before + sum(block_skips)  # includes this resnet's input
            res = _resnet(cin, chans[i], knobs.inplace) - cin
            peak = max(peak, held + res * n_tok[i])
            if "CrossAttn" in btype:  # stacked transformer layers run one after another
                peak = max(peak, held + chans[i] * n_tok[i] + tr(chans[i], i))
            block_skips.append(chans[i] * n_tok[i])
            cin = chans[i]
        if i < depth - 1:  # downsampler output, also a skip
            block_skips.append(chans[i] * n_tok[i + 1])
            peak = max(peak, held_before + sum(block_skips))
        skips += block_skips
    # mid block: resnet, transformer(s), resnet at the deepest level
    c, lvl = chans[-1], depth - 1
    held = c * n_tok[lvl] if knobs.skips_on_cpu else sum(skips)  # includes the mid input
    peak = max(peak, held + (_resnet(c, c, knobs.inplace) - c) * n_tok[lvl])
    peak = max(peak, held + c * n_tok[lvl] + tr(c, lvl))
    # up path: the caller holds the block input and all of this block's skips until it returns
    rchans = chans[::-1]
    h_ch = c
    for j, btype in enumerate(up_types):
        lvl = depth - 1 - j
        mine = skips[-(layers + 1):]
        skips = skips[:-(layers + 1)]
        held = sum(mine) + (0.0 if knobs.skips_on_cpu else sum(skips)) + h_ch * n_tok[lvl]
        skip_ch = [s / n_tok[lvl] for s in mine][::-1]
        for k in range(layers + 1):
            cin = (h_ch if k == 0 else rchans[j]) + skip_ch[k]
            peak = max(peak, held + _resnet(round(cin), rchans[j], knobs.inplace) * n_tok[lvl])
            if "CrossAttn" in btype:
                peak = max(peak, held + rchans[j] * n_tok[lvl] + tr(rchans[j], lvl))
        if lvl > 0:  # upsampler: input, nearest x2 output, conv output
            peak = max(peak, held + rchans[j] * (n_tok[lvl] + 2 * n_tok[lvl - 1]))
        h_ch = rchans[j]
    return int(peak * b * dtype_bytes)


def vae_activation_bytes(cfg: dict, *, height: int, width: int, tile_px: int, dtype_bytes: int,
                         encode: bool = True) -> int:
    """Peak activation bytes of a VAE decode (and encode) of one tile, or the whole image at 0."""
    chans = list(cfg["block_out_channels"])
    layers = cfg.get("layers_per_block", 2)

    def pixels(pad):
        if not tile_px:
            return height * width
        return min(height, tile_px + 2 * pad) * min(width, tile_px + 2 * pad)

    # decoder: conv_in + mid at latent res, then up blocks of (layers + 1) resnets each
    p = pixels(DECODE_PAD_PX)
    n = [p / 64, p / 16, p / 4, p]  # tokens at latent, x2, x4, x8
    rch = chans[::-1]
    peak = _resnet(rch[0], rch[0], False) * n[0]
    peak = max(peak, 7 * rch[0] * n[0])  # mid attention: input, norm, q, k, v, out, W_o out
    h_ch = rch[0]
    for j, c in enumerate(rch):
        for k in range(layers + 1):
            cin = h_ch if k == 0 else c
            held = h_ch * n[j] if k else 0.0  # the caller's reference to the block input
            peak = max(peak, held + _resnet(cin, c, False) * n[j])
        if j < len(rch) - 1:
            peak = max(peak, c * (n[j] + 2 * n[j + 1]))
        h_ch = c
    peak = max(peak, 3 * chans[0] * n[-1] + 3 * 3 * n[-1])  # norm_out, SiLU, conv_out + image
    if encode:  # encoder: resnets at full resolution dominate
        p = pixels(ENCODE_PAD_PX)
        peak = max(peak, 3 * p + _resnet(chans[0], chans[0], False) * p)
    return int(peak * dtype_bytes)


def weight_bytes(unet_config: dict, vae_config: dict, dtype_bytes: int,
                 text_encoders_bytes: int | None = None) -> dict[str, int]:
    """Bytes of each model's weights: unet, vae (maybe fp32), text encoders."""
    te = text_encoders_bytes
    if te is None:
        te = text_encoder_params(unet_config) * dtype_bytes
    return {"unet": param_count("unet", unet_config) * dtype_bytes,
            "vae": param_count("vae", vae_config) * vae_dtype_bytes(vae_config, dtype_bytes),
            "text": te}


def layer_bytes(unet_config: dict, dtype_bytes: int) -> int:
    """About two of the largest layers in flight under sequential offload (3x3 conv at C_max)."""
    c = max(unet_config["block_out_channels"])
    return 2 * 9 * c * c * dtype_bytes


def estimate_peak_bytes(unet_config: dict, vae_config: dict, *, width: int, height: int,
                        dtype_bytes: int = 2, batch: int = 2, knobs: Knobs | None = None,
                        text_encoders_bytes: int | None = None, linfusion: bool = True,
                        device: str = "cuda") -> int:
    """Peak device bytes of one stage: max over its UNet and VAE phases of weights + activations.

    batch is the UNet batch (2 with classifier-free guidance; cfg_split runs it as two of 1).
    """
    k = knobs or Knobs()
    w = weight_bytes(unet_config, vae_config, dtype_bytes, text_encoders_bytes)
    vb = vae_dtype_bytes(vae_config, dtype_bytes)
    unet_act = unet_activation_bytes(unet_config, latent_h=-(-height // 8),
                                     latent_w=-(-width // 8), batch=batch,
                                     dtype_bytes=dtype_bytes, knobs=k, linfusion=linfusion)
    vae_act = vae_activation_bytes(vae_config, height=height, width=width,
                                   tile_px=k.vae_tile_px, dtype_bytes=vb)
    return stage_peak(w, unet_act, vae_act, offload=k.offload, device=device,
                      layer_bytes=layer_bytes(unet_config, dtype_bytes))


def stage_peak(weights: dict[str, int], unet_act: int, vae_act: int, *, offload: str,
               device: str, layer_bytes: int) -> int:
    """Resident weights (by offload mode) + the larger phase's activations + margin."""
    if offload == "none" or device != "cuda":
        unet_w = vae_w = sum(weights.values())
    elif offload == "model":  # accelerate keeps only the running model on the device
        unet_w, vae_w = weights["unet"], weights["vae"]
    else:  # sequential: each layer's weights arrive just before it runs
        unet_w = vae_w = layer_bytes
    peak = max(unet_w + unet_act, vae_w + vae_act)
    context = CUDA_CONTEXT_BYTES if device == "cuda" else 0
    return int(peak * (1 + OVERHEAD)) + context
