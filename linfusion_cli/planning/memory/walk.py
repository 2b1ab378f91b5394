"""Activation working sets of the UNet and VAE forwards, walked from their configs (no torch).

The model walks the diffusers UNet and VAE structure named by their `config.json` and keeps a
running count of the tensors alive at each op: the skip tensors the UNet holds for its up path,
the block input its caller keeps referenced, and the op's own temporaries. Counts are in
"channels per token" and are multiplied by tokens x batch x bytes at the end. Assumptions
(documented so they can be checked against measurements, see tests/planning/test_planner.py):

* ResNet: GroupNorm and SiLU each produce a new tensor (SiLU in place with `inplace`); the block
  input stays alive until the block returns; the shortcut conv, the residual sum and its division
  by output_scale_factor each add one output-sized tensor (cin + 4 cout at the end).
* UNet2DConditionModel.forward: the skips stay referenced until their up block returns (the
  caller's `res_samples` and the rest); the up block's input (`sample`) stays alive for the whole
  block; each resnet there takes torch.cat([h, skip]), a new (B, C_h + C_skip, h, w) tensor,
  while both inputs are alive. With skips_on_cpu only the down block's input and outputs (until
  it returns) and, on the way up, the one skip being consumed are on the device (knobs.py).
* Transformer2DModel + BasicTransformerBlock, per token: the Transformer2D input, the block
  input h, then `norm_hidden_states` and `attn_output` stay referenced until rebound and every
  residual sum is a new tensor, so the moments are: self-attention (h, norm1, attention working
  set), norm2 (5C), cross-attention through SDPA (h, attn1 out, sum, norm2, + q, SDPA output,
  W_o output: 7C; 77 context tokens), the feed-forward (h, attn2 out, sum, norm3 + GEGLU: 8C
  projection, 4C GELU(gate), 4C product; with `ff_chunk` the last chunk's GEGLU beside the earlier
  chunks' outputs, or all outputs and their concatenation, 2C). LinFusion whole (N <= chunk):
  the largest of its moments, with q, k, v held: kv_state's four fp32 copies (3C + 4 fp32 C),
  read_out's (4C + 3 fp32 C), or q, k, v, o, merged heads, W_o out (6C); with `attn_chunk` (module.py
  _forward_chunked) only its output spans all tokens (1C + O(chunk)), and the cross-attention
  moment (7C) sets the block's peak. Quadratic self-attention is SDPA memory-efficient (5C).
* The VAE decoder (and encoder) is walked the same way on one tile with its context padding
  (figures.DECODER_CONTEXT and ENCODER_CONTEXT latent px a side) or on the whole image when untiled; its mid-block
  attention is SDPA memory-efficient (O(N)). Tiled (linfusion_cli.vae), the latent-resolution
  layers (conv_in, mid block, first up block's resnets) still run once on the WHOLE latent:
  6 x 512 channels per latent pixel (whole_latent_channels), 12 GiB in bf16 at 16384x8192; band
  by band (the band_rows knob) two maps plus one band (whole_latent_elements_banded, checked
  against trace.trace_vae_whole_bytes). The VAE runs in bf16 beside a 16-bit UNet (fp32
  on GPUs without bf16, which the caller says with vae_bytes).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ... import figures
from ...vae.tiles import rank_bands, tile_grid, window_halo
from ...errors import PlanError
from .knob_table import KNOBS, OFFLOADS

DECODE_PAD_PX = figures.DECODER_CONTEXT * 8  # context around a decoder tile, image px a side
ENCODE_PAD_PX = figures.ENCODER_CONTEXT * 8  # context around an encoder tile
STATS_PX = figures.STATS_PX  # long side, latent px, of the "estimated" mode's stats pass


@dataclass(frozen=True)
class Knobs:
    """Settings that trade speed for memory but leave the image unchanged, typed: the fields of
    knob_table.KNOBS, in its order (planner.MemoryPlan adds the estimate, pipeline/knobs.py
    applies and reads them back)."""

    offload: str = "none"  # "none" | "model" | "sequential" (accelerate CPU offload)
    vae_tile_px: int = 0  # VAE tile size in output pixels, 0 = untiled
    ff_chunk: int = 0  # transformer feed-forward chunk in tokens, 0 = off
    cfg_split: bool = False  # classifier-free guidance as two half batches
    attn_chunk: int = 0  # LinFusion token chunk (0 only without LinFusion)
    inplace: bool = False  # in-place SiLU on spatial tensors (inference only)
    skips_on_cpu: bool = False  # UNet skip tensors parked in CPU memory
    band_rows: int = 0  # latent rows per band of the band-wise UNet and VAE latent part, 0 = off

    def __post_init__(self) -> None:
        if self.offload not in OFFLOADS:
            raise PlanError(f"offload must be one of {', '.join(OFFLOADS)}, not {self.offload!r}")
        for knob in KNOBS:
            if knob.kind is int and getattr(self, knob.name) < 0:
                raise PlanError(f"{knob.name} must be >= 0 (0 = off), not {getattr(self, knob.name)}")


# ---------------------------------------------------------------- working sets (channels/token)

class _Peak:
    """Running maximum of named terms (element counts per batch item) and where it happened."""

    def __init__(self) -> None:
        self.value = 0.0
        self.where = ""
        self.terms: dict[str, float] = {}

    def at(self, where: str, terms: dict[str, float]) -> None:
        total = sum(terms.values())
        if total > self.value:
            self.value, self.where, self.terms = total, where, dict(terms)


def _resnet(cin: int, cout: int, inplace: bool) -> int:
    """Peak of a ResnetBlock2D including its input (held by the caller), channels/token.

    Moments (diffusers ResnetBlock2D.forward): norm1 + SiLU (3 cin, 2 in place); conv1 (input,
    SiLU out, conv out); + temb, norm2, SiLU, conv2 (input + 2 cout; 1 cout less for an in-place
    SiLU, which never sets the peak); the shortcut conv, the residual sum and its division by
    output_scale_factor (input, shortcut, conv2, sum, quotient: cin + 4 cout; 3 without shortcut).
    """
    act1 = max(2 * cin + (0 if inplace else cin), 2 * cin + cout)
    act2 = cin + 2 * cout
    out = cin + (4 if cin != cout else 3) * cout
    return max(act1, act2, out)


def _linfusion_chunked(k: Knobs, n: int) -> bool:
    """Whether LinFusion runs its projections chunk by chunk (module.py _forward_chunked)."""
    return bool(k.attn_chunk) and n > k.attn_chunk


def _transformer_phases(c: int, n: int, k: Knobs, linfusion: bool, bytes_: int,
                        mid: int | None) -> dict[str, dict[str, float]]:
    """Moments of a Transformer2DModel beyond its input x (which the caller holds), channels/token.

    Walks diffusers' Transformer2DModel and BasicTransformerBlock: the block input h is held by
    Transformer2D while the block runs, `norm_hidden_states` and `attn_output` stay referenced
    until rebound, and each residual sum makes a new tensor. Stacked layers run one at a time.
    """
    frac = lambda chunk: min(n, chunk) / n
    if linfusion and _linfusion_chunked(k, n):
        # _forward_chunked: only the output spans N; per chunk the two MLPs (3 m), x + f(x),
        # the projection, and fp32 copies (feature map, scaled k/v or numerator/quotient)
        m = mid or c
        temps = (3 * m + 3 * c + 4 * c * 4 / bytes_) * frac(k.attn_chunk)
        attn1 = {"attn1 output": c, "attn1 chunk temps": temps}
    elif linfusion:  # module.py forward, N <= chunk: whole q, k, v and ops.py's fp32 copies
        m, f32 = mid or c, 4 * c / bytes_  # one fp32 copy of a (N, C) tensor, in C-units
        moments = {"q/k projections (MLP, x + f(x))": c + max(2 * m, m + c, 2 * c),
                   "kv_state: q, k, v + fp32 k, v, scaled k, v": 3 * c + 4 * f32,
                   "read_out: q, k, v + fp32 phi(q), numerator, quotient + out": 4 * c + 3 * f32,
                   "q, k, v, o, merged heads, W_o out": 6 * c}
        name = max(moments, key=moments.get)
        attn1 = {f"attn1 {name}": moments[name]}
    else:  # SDPA memory-efficient/flash: q, k, v, output, reshape copy (no N x N tensor)
        attn1 = {"attn1 q/k/v/o/out (SDPA)": 5 * c}
    if k.ff_chunk and n > k.ff_chunk:  # knobs._chunked: the last chunk's GEGLU beside the
        # outputs of the chunks before it, or all outputs and their concatenation
        f = frac(k.ff_chunk)
        during, joining = (1 - f) * c + 16 * c * f, 2 * c
        ff = ({"ff earlier chunk outputs": (1 - f) * c, "ff GEGLU chunk": 16 * c * f}
              if during >= joining else {"ff chunk outputs + cat": joining})
    else:  # GEGLU: projection 8C, GELU(gate) 4C, product 4C
        ff = {"ff GEGLU (proj 8C, gelu 4C, prod 4C)": 16 * c}
    h = {"block input h": c}
    return {
        "proj_in/out": {"proj in/out temps": 2 * c},
        "attn1": {**h, "norm1": c, **attn1},
        "norm2": {**h, "norm1": c, "attn1 out": c, "h + attn1": c, "norm2": c},
        "attn2": {**h, "attn1 out": c, "h + attn1": c, "norm2": c, "attn2 q/sdpa/out": 3 * c},
        "ff": {**h, "attn2 out": c, "h + attn2": c, "norm3": c, **ff},
        "ff residual": {**h, "attn2 out": c, "h + attn2": c, "norm3": c, "ff out": c, "sum": c},
    }


def _transformer(c: int, n: int, k: Knobs, linfusion: bool, bytes_: int, mid: int | None) -> float:
    """Peak of a Transformer2DModel beyond its input (which the caller holds), channels/token."""
    return max(sum(t.values()) for t in
               _transformer_phases(c, n, k, linfusion, bytes_, mid).values())


def _levels(h: int, w: int, depth: int) -> list[int]:
    """Tokens per resolution level for a (h, w) latent: stride-2 convs round up."""
    out = []
    for _ in range(depth):
        out.append(h * w)
        h, w = (h + 1) // 2, (w + 1) // 2
    return out


def _walk_unet(cfg: dict, *, latent_h: int, latent_w: int, knobs: Knobs, linfusion: bool,
               dtype_bytes: int, mid_dim: int | None, through_mid: bool = False) -> _Peak:
    """The UNet forward's peak per batch item, as named element counts (see unet_breakdown).

    What diffusers' UNet2DConditionModel.forward keeps alive: every skip until its up block
    returns (on the CPU with skips_on_cpu, except the device copy of the down block's input and
    its outputs until the block returns); during an up block, the block input (the caller's
    `sample`), the skip tuple (the caller's `res_samples`), the skip being consumed (a local
    until the next one replaces it; with skips_on_cpu the only skip on the device), and
    torch.cat([h, skip]) as the resnet input.

    through_mid: stop after the middle block (a ControlNet's own down and middle path).
    """
    k = knobs
    chans = list(cfg["block_out_channels"])
    depth = len(chans)
    n_tok = _levels(latent_h, latent_w, depth)
    layers = cfg.get("layers_per_block", 2)
    down_types, up_types = cfg["down_block_types"], cfg["up_block_types"]
    peak = _Peak()

    def resnet(where, held, cin, cout, lvl, input_held=True):
        extra = _resnet(cin, cout, k.inplace) - (cin if input_held else 0)
        peak.at(where, {**held, f"resnet {cin}->{cout} working": extra * n_tok[lvl]})

    def transformer(where, held, c, lvl):
        n = n_tok[lvl]
        for phase, terms in _transformer_phases(c, n, k, linfusion, dtype_bytes, mid_dim).items():
            peak.at(f"{where} {phase}", {**held, "transformer input x": c * n,
                                         **{t: v * n for t, v in terms.items()}})

    skips: list[tuple[str, float]] = [("skip conv_in", chans[0] * n_tok[0])]
    for i, btype in enumerate(down_types):
        block: list[tuple[str, float]] = []
        cin = chans[i - 1] if i else chans[0]
        if k.skips_on_cpu:  # the device copy of the block input (also the last skip)
            before = {"down block input (device copy)": cin * n_tok[i]}
        else:
            before = {"skips held": sum(v for _, v in skips)}
        for j in range(layers):
            held = {**before, "this block's outputs": sum(v for _, v in block)}
            resnet(f"down{i}.resnet{j}", held, cin, chans[i], i)
            if "CrossAttn" in btype:
                transformer(f"down{i}.attn{j}", held, chans[i], i)
            block.append((f"skip down{i}.{j}", chans[i] * n_tok[i]))
            cin = chans[i]
        if i < depth - 1:  # downsampler output, also a skip
            block.append((f"skip down{i}.down", chans[i] * n_tok[i + 1]))
            peak.at(f"down{i}.downsample", {**before, "this block's outputs":
                                             sum(v for _, v in block)})
        skips += block
    c, lvl = chans[-1], depth - 1
    held = {"mid input": c * n_tok[lvl]}
    if not k.skips_on_cpu:
        held["skips held"] = sum(v for _, v in skips)
    resnet("mid.resnet0", held, c, c, lvl, input_held=True)
    transformer("mid.attn0", held, c, lvl)
    resnet("mid.resnet1", {**held, "resnet input": c * n_tok[lvl]}, c, c, lvl, input_held=True)
    if through_mid:
        return peak
    rchans = chans[::-1]
    h_ch = c
    for j, btype in enumerate(up_types):
        lvl = depth - 1 - j
        n = n_tok[lvl]
        mine = skips[-(layers + 1):][::-1]  # consumed last first
        skips = skips[:-(layers + 1)]
        base = {"up block input (caller's sample)": h_ch * n}
        if not k.skips_on_cpu:
            base["skips of later blocks"] = sum(v for _, v in skips)
            base["this block's skips"] = sum(v for _, v in mine)
        for r in range(layers + 1):
            skip_ch = round(mine[r][1] / n)
            held = dict(base)
            if k.skips_on_cpu:
                held["consumed skip (device copy)"] = mine[r][1]
            cin = (h_ch if r == 0 else rchans[j]) + skip_ch
            resnet(f"up{j}.resnet{r} (input = cat)", held, cin, rchans[j], lvl, input_held=False)
            if "CrossAttn" in btype:
                transformer(f"up{j}.attn{r}", held, rchans[j], lvl)
        if lvl > 0:  # upsampler: input, nearest x2 output, conv output
            peak.at(f"up{j}.upsample", {**held, "upsampler input": rchans[j] * n,
                                        "upsampled + conv out": 2 * rchans[j] * n_tok[lvl - 1]})
        h_ch = rchans[j]
    peak.at("conv_norm_out/act/conv_out", {"up output": h_ch * n_tok[0],
                                           "norm + SiLU": (1 if k.inplace else 2) * h_ch * n_tok[0]})
    return peak


def unet_activation_bytes(cfg: dict, *, latent_h: int, latent_w: int, batch: int,
                          dtype_bytes: int, knobs: Knobs, linfusion: bool = True,
                          mid_dim: int | None = None, **walk) -> int:
    """Peak activation bytes of one UNet forward, walking the down, mid and up paths
    (walk: _walk_unet's through_mid)."""
    b = 1 if knobs.cfg_split else batch
    peak = _walk_unet(cfg, latent_h=latent_h, latent_w=latent_w, knobs=knobs,
                      linfusion=linfusion, dtype_bytes=dtype_bytes, mid_dim=mid_dim, **walk)
    return int(peak.value * b * dtype_bytes)


def unet_breakdown(cfg: dict, *, latent_h: int, latent_w: int, batch: int, dtype_bytes: int,
                   knobs: Knobs, linfusion: bool = True,
                   mid_dim: int | None = None) -> tuple[str, dict[str, int]]:
    """Where the UNet forward peaks and the bytes of each tensor alive there."""
    b = 1 if knobs.cfg_split else batch
    peak = _walk_unet(cfg, latent_h=latent_h, latent_w=latent_w, knobs=knobs,
                      linfusion=linfusion, dtype_bytes=dtype_bytes, mid_dim=mid_dim)
    return peak.where, {t: int(v * b * dtype_bytes) for t, v in peak.terms.items()}


def _decoder_walk(cfg: dict, p: float) -> float:
    """Peak elements of the decoder on p output pixels: conv_in + mid at latent res, then up
    blocks of (layers + 1) resnets each, the upsamplers, norm_out / SiLU / conv_out."""
    chans = list(cfg["block_out_channels"])
    layers = cfg.get("layers_per_block", 2)
    f = 2 ** (len(chans) - 1)
    n = [p / (f // 2 ** j) ** 2 for j in range(len(chans))]  # tokens per level, latent first
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
    return max(peak, 3 * chans[0] * n[-1] + 3 * 3 * n[-1])  # norm_out, SiLU, conv_out + image


def _stats_pixels(cfg: dict, height: int, width: int) -> int:
    """Output pixels of the tiled VAE's stats pass ("estimated" mode, vae/tiled.py): an untiled
    pass over the latent downscaled to a long side of STATS_PX latent px (tiles.downscaled_size)."""
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    h, w = -(-height // f), -(-width // f)
    if max(h, w) > STATS_PX:
        scale = STATS_PX / max(h, w)
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
    return h * w * f * f


def vae_activation_bytes(cfg: dict, *, height: int, width: int, tile_px: int, dtype_bytes: int,
                         encode: bool = True, band_rows: int = 0,
                         token_limit: int = figures.VAE_ATTN_TOKEN_LIMIT["cuda"],
                         ranks: int = 1) -> int:
    """Peak activation bytes of a VAE decode (and encode): untiled at tile_px 0, else the largest
    of one padded tile, the stats pass and the whole-latent part (linfusion_cli.vae), that last
    one band by band with band_rows > 0 (whole_latent_elements_banded; token_limit: the mid
    attention's exact limit, the device's figures.VAE_ATTN_TOKEN_LIMIT). ranks > 1: one rank's
    share of a tiled pass under band parallelism (its band of the latent part; a tile is as
    large or thinner)."""
    chans = list(cfg["block_out_channels"])

    def pixels(pad):
        if not tile_px:
            return height * width
        return min(height, tile_px + 2 * pad) * min(width, tile_px + 2 * pad)

    peak = _decoder_walk(cfg, pixels(DECODE_PAD_PX))
    f = 2 ** (len(chans) - 1)
    lh, lw = -(-height // f), -(-width // f)
    parts = None  # the ranks' bands when they share the tiled pass (cores: the same for encode)
    if tile_px and ranks > 1:
        parts = rank_bands(lh, lw, max(1, tile_px // f), figures.DECODER_CONTEXT, ranks)
        parts = parts if len(parts) > 1 else None
    banded = tile_px and (band_rows > 0 or parts)
    if banded:  # the whole-latent part band by band
        whole = whole_latent_elements_banded(cfg, latent_h=lh, latent_w=lw, band_rows=band_rows,
                                             dtype_bytes=dtype_bytes, token_limit=token_limit,
                                             parts=parts)
        peak = max(peak, whole, _decoder_walk(cfg, _stats_pixels(cfg, height, width)))
    elif tile_px:  # linfusion_cli.vae runs the latent-resolution layers ONCE on the whole latent
        peak = max(peak, whole_latent_channels(cfg) * latent_tokens(cfg, height, width),
                   _decoder_walk(cfg, _stats_pixels(cfg, height, width)))
    if encode:  # encoder: resnets at full resolution dominate
        for p in [pixels(ENCODE_PAD_PX)] + ([_stats_pixels(cfg, height, width)] if tile_px else []):
            tile = 3 * p + _resnet(chans[0], chans[0], False) * p
            # banded: beside the tiles, the latent-resolution map they fill (vae/tiled.py)
            held = max(chans) * lw * (max(b - a for a, b in parts) if parts else lh) if banded else 0
            peak = max(peak, held + tile)
    return int(peak * dtype_bytes)


def latent_tokens(cfg: dict, height: int, width: int) -> int:
    """Latent pixels of an image (VAE factor 2^(levels - 1), 8 for SD VAEs)."""
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    return -(-height // f) * -(-width // f)


def whole_latent_channels(cfg: dict) -> int:
    """Peak channels/latent token of the tiled VAE's whole-map part (vae/blocks.py decoder_whole,
    encoder_whole): conv_in, the mid block, the resnets of the first up (last down) block, all at
    C = the widest level. The mid attention holds its input x, q, k, v (the norm output is
    deleted), the SDPA output and its head-merging copy: 6C. Resnets: x + 3C. Windowing past
    the token limit does not help: q, k and v are projected for the whole map first."""
    return 6 * max(cfg["block_out_channels"])


def _attention_window(length: int, window: int = figures.ATTENTION_WINDOW,
                      overlap: int = figures.ATTENTION_OVERLAP) -> int:
    """The longest attention window along an axis (vae/attention.py mid_attention's defaults
    through vae/tiles.py split_axis: near-equal cores of <= window - overlap, overlap/2 context)."""
    tile, ctx = window - overlap, overlap // 2
    n = -(-length // tile)
    edges = [round(i * length / n) for i in range(n + 1)]
    return max(min(length, b + ctx) - max(0, a - ctx) for a, b in itertools.pairwise(edges))


def whole_latent_elements_banded(cfg: dict, *, latent_h: int, latent_w: int, band_rows: int,
                                 dtype_bytes: int, token_limit: int, parts=None) -> float:
    """Peak elements (in the VAE dtype) of the tiled VAE's whole-latent part run band by band
    (vae/blocks.py decoder_whole/encoder_whole with band_rows > 0), C = the widest level.

    Two whole maps (a layer's input and output) plus the largest band working set:
    * a resnet band (bands/layers.py resnet), R rows and a 1-row halo either side: conv2's input
      rows (carry + out, R + 2), `normed`'s float32 addcmul and its cast back (R + 2 each;
      in float32 one tensor), later conv2's output, the residual sum and its quotient (3R + 2);
    * an attention window (vae/attention.py _windowed_banded, T <= 128^2 tokens, _attention_window): its input,
      q, k, v and the SDPA output (5T), plus one query chunk's output when queries are chunked
      (the SDPA itself a memory-efficient kernel: no score matrix), or the normalisation's
      float32 temp and its cast (3T in 16-bit).
    Within token_limit the attention is exact and global as before (6C per token: input,
    normalised copy, q, k, v, output). The decoder also holds its latent and post_quant_conv's
    output (2 x latent channels per token); the encoder's head makes 2 x 8 channels.

    parts (band parallelism, vae/tiles.py rank_bands): one rank's share, whose "whole maps" are
    its largest band (band_rows 0: one band). Windowed attention adds the windows' rows from the
    neighbours and this rank's rows sent to them (window_halo, received and sent copies); exact
    attention adds the gathered keys and values (2C per row of N equal bands) beside the
    rank's own and one band's queries (4C)."""
    c = max(cfg["block_out_channels"])
    height = latent_h if not parts else max(b - a for a, b in parts)
    n = height * latent_w  # this rank's tokens (all of them in one process)
    rows = min(band_rows or height, height)
    f32 = 4 / dtype_bytes  # a float32 tensor in dtype units
    normed = (rows + 2) * (1 + f32 + (1 if dtype_bytes < 4 else 0))
    band = max(normed, 3 * rows + 2) * latent_w * c
    t = _attention_window(latent_h) * _attention_window(latent_w)
    step = max(1024, (256 << 20) // (4 * t))  # attention._sdpa_chunked's query step
    window = max(5 * t + (step if t > step else 0), (2 + f32) * t) * c
    exact = latent_h * latent_w <= token_limit
    if parts and not exact:
        windows = tile_grid(latent_h, latent_w, figures.ATTENTION_WINDOW - figures.ATTENTION_OVERLAP,
                            figures.ATTENTION_OVERLAP // 2)
        window += 2 * sum(window_halo(windows, parts)) * latent_w * c
    peak = 2 * c * n + max(band, window)
    if exact and parts:
        gathered = 2 * c * len(parts) * height * latent_w
        peak = max(peak, 2 * c * n + gathered + max(2 * c * n, 4 * c * rows * latent_w))
    elif exact:
        peak = max(peak, 6 * c * n)
    return peak + 2 * cfg.get("latent_channels", 4) * n
