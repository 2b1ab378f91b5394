"""The band-wise UNet forward's working set (linfusion_cli/bands), walked from the config.

What bands/unet_forward.py keeps alive, layer by layer (channels x tokens of a level; batch and bytes
are applied by the caller, as in walk.py):

* every layer holds its whole input and its whole output map, nothing else whole: a resnet
  its input and output (conv2 is written over conv1's output), a transformer its input and the
  (B, N, inner) token map, a downsampler its input and the half-size output;
* an up block's resnet reads cat([h, skip]) band by band: h whole (right after an upsampler,
  its output, made whole band by band beside its input; with parked skips at full resolution
  the low-resolution map instead, upsampled per read), the skip whole only while skips stay
  on the device (all skips not yet consumed are held then);
* one band's working set on top: the layer's per-token moments (walk.py's _resnet and
  _transformer_phases) on `rows` latent rows (halved per level) plus the conv halo rows; with
  parked skips, an up resnet's conv1 pass also holds the next band's skip rows, fetched ahead
  (runtime/staging.py), and keeps its shortcut in h's spent rows (no extra map).
"""

from __future__ import annotations

from .walk import Knobs, _Peak, _levels, _transformer_phases, unet_activation_bytes, unet_breakdown


def _band_rows(band_rows: int, level: int, height: int) -> int:
    """bands.rows.level_rows, capped by the level's height (band_rows 0: the level whole, as
    bands.rows.whole_levels makes it under band parallelism without band_rows)."""
    return min(height, max(1, -(-band_rows // (1 << level)))) if band_rows else height


def walk_banded(cfg: dict, *, latent_h: int, latent_w: int, knobs: Knobs, linfusion: bool,
                dtype_bytes: int, mid_dim: int | None, through_mid: bool = False) -> _Peak:
    """Peak of the band-wise forward per batch item, as named element counts."""
    k = knobs
    chans = list(cfg["block_out_channels"])
    depth = len(chans)
    layers = cfg.get("layers_per_block", 2)
    heights, widths = [latent_h], [latent_w]
    for _ in range(depth - 1):
        heights.append((heights[-1] + 1) // 2)
        widths.append((widths[-1] + 1) // 2)
    n_tok = _levels(latent_h, latent_w, depth)
    down_types, up_types = cfg["down_block_types"], cfg["up_block_types"]
    parked = k.skips_on_cpu
    peak = _Peak()

    def band(level: int, halo: int = 0) -> int:  # tokens of one band (+ conv halo rows)
        return (_band_rows(k.band_rows, level, heights[level]) + halo) * widths[level]

    def resnet(where, held, cin, cout, lvl, source_extra=0.0):
        # pass 2's moment: the input band (with one halo row a side), GroupNorm's float32
        # result, its cast back and conv1's output band; an upsampled source's rows first
        # need the nearest rows and the upsampler's conv output beside the band
        b = band(lvl, 2)
        work = max((2 + 4 / dtype_bytes) * cin + cout, cin + source_extra) * b
        peak.at(where, {**held, f"resnet output map ({cout} ch)": cout * n_tok[lvl],
                        "resnet band": work})

    def transformer(where, held, c, lvl):
        nb = band(lvl)
        phases = _transformer_phases(c, nb, k, linfusion, dtype_bytes, mid_dim)
        # the block input is a view of the token map here, and attn2's output is gone by the
        # feed-forward: two C less than walk.py's whole-map moments
        worst = max(sum(t.values()) for t in phases.values()) - 2 * c
        peak.at(where, {**held, f"transformer input map ({c} ch)": c * n_tok[lvl],
                        "token map": c * n_tok[lvl], "transformer band": worst * nb})

    skips: list[float] = [chans[0] * n_tok[0]]  # conv_in's output
    peak.at("conv_in", {"latents in": cfg.get("in_channels", 4) * n_tok[0],
                        "conv_in output": chans[0] * n_tok[0]})

    def held_skips(exclude_last: bool) -> dict:
        if parked:
            return {}
        s = sum(skips[:-1] if exclude_last else skips)
        return {"skips held": s} if s else {}

    for i, btype in enumerate(down_types):
        cin = chans[i - 1] if i else chans[0]
        for j in range(layers):
            held = {**held_skips(True), f"resnet input map ({cin} ch)": cin * n_tok[i]}
            resnet(f"down{i}.resnet{j}", held, cin, chans[i], i)
            if "CrossAttn" in btype:
                transformer(f"down{i}.attn{j}", held_skips(False), chans[i], i)
            skips.append(chans[i] * n_tok[i])
            cin = chans[i]
        if i < depth - 1:
            peak.at(f"down{i}.downsample", {**held_skips(True), "input": chans[i] * n_tok[i],
                                             "output": chans[i] * n_tok[i + 1]})
            skips.append(chans[i] * n_tok[i + 1])
    c, lvl = chans[-1], depth - 1
    held = {**held_skips(True), "mid input map": c * n_tok[lvl]}
    resnet("mid.resnet0", held, c, c, lvl)
    transformer("mid.attn0", held_skips(False), c, lvl)
    resnet("mid.resnet1", held, c, c, lvl)
    if through_mid:
        return peak
    rchans = chans[::-1]
    h_ch, virtual = c, False
    for j, btype in enumerate(up_types):
        lvl = depth - 1 - j
        for r in range(layers + 1):
            skip = skips.pop()
            skip_ch = round(skip / n_tok[lvl])
            h_in = h_ch if r == 0 else rchans[j]
            extra = 0.0
            if r == 0 and virtual:  # rows.Upsampled: the low-res map, its conv run per band
                held = {"low-resolution map (upsampler input)": h_in * n_tok[lvl + 1]}
                extra = 2 * h_in  # nearest rows and the conv output, per band token
            else:  # h, or the upsampler's output made whole
                held = {f"h ({h_in} ch)": h_in * n_tok[lvl]}
            if not parked:
                held["skips held"] = sum(skips) + skip
            else:  # conv1's pass fetches the next band's skip rows (+ halo) ahead
                held["next skip band (fetched ahead)"] = skip_ch * band(lvl, 2)
            resnet(f"up{j}.resnet{r}", held, h_in + skip_ch, rchans[j], lvl, extra)
            if "CrossAttn" in btype:
                transformer(f"up{j}.attn{r}", held_skips(False), rchans[j], lvl)
        h_ch = rchans[j]
        virtual = parked and lvl == 1  # bands.unet_forward.upsampled: not made whole
        if lvl > 0 and not virtual:  # blocks.upsample: its input, its output, a band's rows
            peak.at(f"up{j}.upsample", {**held_skips(False), "input": h_ch * n_tok[lvl],
                                         "output": h_ch * n_tok[lvl - 1],
                                         "upsample band": 3 * h_ch * band(lvl - 1, 2)})
    peak.at("conv_norm_out/conv_out", {"up output": h_ch * n_tok[0],
                                       "head band": 3 * h_ch * band(0, 2)})
    return peak


def activation_bytes(cfg: dict, *, latent_h: int, latent_w: int, batch: int, dtype_bytes: int,
                     knobs: Knobs, linfusion: bool = True, mid_dim: int | None = None,
                     through_mid: bool = False, banded: bool = False) -> int:
    """walk.unet_activation_bytes, band-wise when knobs.band_rows or `banded` (band parallelism:
    band-wise whatever band_rows says, one band per level without it); one entry for both."""
    if not (knobs.band_rows or banded):
        return unet_activation_bytes(cfg, latent_h=latent_h, latent_w=latent_w, batch=batch,
                                     dtype_bytes=dtype_bytes, knobs=knobs, linfusion=linfusion,
                                     mid_dim=mid_dim, through_mid=through_mid)
    b = 1 if knobs.cfg_split else batch
    peak = walk_banded(cfg, latent_h=latent_h, latent_w=latent_w, knobs=knobs,
                       linfusion=linfusion, dtype_bytes=dtype_bytes, mid_dim=mid_dim,
                       through_mid=through_mid)
    return int(peak.value * b * dtype_bytes)


def breakdown(cfg: dict, *, latent_h: int, latent_w: int, batch: int, dtype_bytes: int,
              knobs: Knobs, linfusion: bool = True, mid_dim: int | None = None,
              banded: bool = False) -> tuple[str, dict[str, int]]:
    """walk.unet_breakdown, band-wise when knobs.band_rows or `banded` (as activation_bytes):
    where the forward peaks and the bytes of each term there."""
    if not (knobs.band_rows or banded):
        return unet_breakdown(cfg, latent_h=latent_h, latent_w=latent_w, batch=batch,
                              dtype_bytes=dtype_bytes, knobs=knobs, linfusion=linfusion,
                              mid_dim=mid_dim)
    b = 1 if knobs.cfg_split else batch
    peak = walk_banded(cfg, latent_h=latent_h, latent_w=latent_w, knobs=knobs,
                       linfusion=linfusion, dtype_bytes=dtype_bytes, mid_dim=mid_dim)
    return peak.where, {t: int(v * b * dtype_bytes) for t, v in peak.terms.items()}
