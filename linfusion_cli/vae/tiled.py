"""Tiled VAE decode/encode whose tiles share the whole image's GroupNorm statistics.

Why: a tile that normalises with its own GroupNorm statistics comes out in a different tone than
its neighbours (seams, colour shifts). Here every tile normalises with the whole image's stats.

How: the layers at latent resolution (post_quant_conv, conv_in, mid block incl. its global
attention, and the resnets of the first up block; for the encoder: the last down block's
resnets, mid block, conv_norm_out, conv_out, quant_conv) run ONCE on the whole map; they cost
no more memory than the mid block. Only the high-resolution path is tiled: context-padded
windows (11 latent px for the decoder, 6 latent px = 48 image px for the encoder, windows on the
latent grid so the encoder's stride-2 grids line up), cropped to their cores when written. Output
goes tile by tile into a preallocated uint8 CPU buffer; the float image never exists whole.

Modes (`mode=`):
- "exact": all tiles advance in lock step from GroupNorm to GroupNorm; the driver pools the
  tiles' per-channel moments over their cores (cores partition the image, each pixel counted
  once; var = E[x^2] - E[x]^2 in float64, on the device: no host read) and every tile
  normalises with the result. Paused tiles wait where they are, on the device, while their
  tensors together fit `device_budget` (bytes; the working set, vae/working_set.py, is all
  tiles' tensors at the worst GroupNorm, ~ the largest activation of the tiled path over the
  whole image plus padding); the tiles that do not fit park in host buffers, one per tile,
  allocated once per pass and reused every round, pinned within the host budget (pageable
  beyond), through runtime.transfer with non-blocking copies (vae/parking.py). device_budget None: on CUDA half the GPU memory free when
  the tiles start (figures.VAE_DEVICE_PARK_SHARE), elsewhere no limit (a CPU's tiles are in host
  memory already); 0 parks every tile at every GroupNorm (tests force it on the CPU). The
  report says what moved (TileReport.parked, parked_bytes: each way, counted as copied).
  Measured (benchmarks/vae_tiling.py, SD VAE architecture, random weights, fp32 CPU, 384 and
  512 px, 256 px tiles): PSNR ~90 dB vs untiled, max error 1 uint8 level, seam score identical
  to the untiled image's.
- "estimated": stats recorded once from an untiled pass over a downscaled latent/image (long
  side `stats_px` latent px, default 128); tiles then run one by one with those fixed stats, flat
  memory (one tile's working set), and nothing parks: no tile waits for another. Measured
  32-37 dB, max error 43-63 levels, seam score within 2% of the untiled image's (stats from a
  32 latent px pass, 1.5-2x downscale); ~29 dB reported by the team for a 64 px pass. Per-tile stats (naive) measured 22-26 dB with visible seams.
- None (default): "exact" when its working set fits the host budget (hostmem.vae_park_budget:
  half of the RAM free now, or `host_budget`), else "estimated".

The mid-block attention is global: exact (never an N x N tensor: on CUDA one fused flash /
memory-efficient SDPA call, on the CPU query chunks whose scores stay bounded; attention.py
query_chunk) up to `attn_token_limit` tokens (128^2 on CPU, 1024^2 on CUDA by default); beyond,
it runs in overlapping 128^2 windows, an approximation reported (TileReport.attention) and logged.

The decoder's latent-resolution map (C x h x w, the tiles' windows are cut from it) stays on the
device through the tiled path, as the encoder's does (its tiles fill it there): beside the running
tile, outside device_budget.

With `band_rows` > 0 those latent-resolution layers run band by band (linfusion_cli.bands, the
plan's band_rows knob): the same result (fp32 ~1e-6), but only a layer's input and output map
plus one band of `band_rows` latent rows are alive, and windowed attention normalises each
window on demand (exact global attention keeps its whole q/k/v).

Over a band-parallel group (linfusion_cli.parallel, handed in as `group`) the ranks share one
decode or encode: rank r takes a run of whole tile rows, runs the latent-resolution layers on
the band of latent rows their cores cover (conv halos from its neighbours, GroupNorm moments
and, for exact attention, keys and values gathered from every rank), then its tiles, pooling
their moments with the other ranks'. So each rank holds about 1/N of the latent-resolution
maps; one all-gather puts the image's rows (or the latent's) together on every rank.

Decode and encode share one driver (drive.run_tiles); each reports what it did as one
TileReport, passed to `on_report` when it is done.
"""

from __future__ import annotations

from PIL import Image
import functools
import logging
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..bands.rows import Full
from ..errors import NonFiniteError
from ..hostmem import vae_park_budget
from ..runtime import transfer
from ..figures import DECODER_CONTEXT, ENCODER_CONTEXT, STATS_PX  # shared with the planner
from ..figures import VAE_DEVICE_PARK_SHARE
from .attention import default_token_limit
from .blocks import TileCtx, decoder_split, decoder_tile, decoder_whole, encoder_split, \
    encoder_tile, encoder_whole
from .drive import run_recording, run_tiles
from .parking import Lot
from .pixels import as_uint8_image, preprocess, to_uint8
from .tiles import Tile, band_of, choose_tile_px, downscaled_size, rank_tiles, window_halo
from .working_set import exact_working_set, peak_elements_per_px

log = logging.getLogger(__name__)

MODES = ("exact", "estimated")


@dataclass(frozen=True)
class TileReport:
    """What one decode or encode did, for the run record: how it tiled, and why that mode."""

    tile_px: int  # 0: untiled
    mode: str  # "untiled", "exact" or "estimated"
    tiles: int  # the whole pass's (over ranks: every rank's tiles together)
    attention: str  # the mid-block attention: "exact" or "windowed"
    working_set_bytes: int | None = None  # tiled: what exact mode holds paused (all tiles)
    budget_bytes: int | None = None  # tiled: the host budget it was compared with
    gn_rounds: int | None = None  # exact mode: GroupNorm rounds of the lock step
    band_rows: int | None = None  # tiled: latent rows per band of the whole-latent part (None: off)
    ranks: int | None = None  # processes that shared it (band parallelism; None: one)
    device_budget_bytes: int | None = None  # tiled: device bytes for paused tiles (None: no limit)
    parked: bool | None = None  # tiled: some paused tiles left the device (exact mode only)
    parked_bytes: int | None = None  # tiled: bytes copied to the host, and back, by this process

    def to_dict(self) -> dict:
        """The fields that apply (None ones left out), JSON-safe."""
        return {k: v for k, v in asdict(self).items() if v is not None}


OnReport = Callable[[TileReport], None]


def _where(vae) -> tuple[torch.device, torch.dtype]:
    """The VAE's device and dtype (where every tile runs, and waits unless it must park)."""
    p = next(vae.parameters())
    return p.device, p.dtype


def _device_budget(device: torch.device, given: int | None) -> int | None:
    """Bytes of paused tiles the device may hold: as given; else on CUDA a share
    (figures.VAE_DEVICE_PARK_SHARE) of its memory free now, the running tile needing the rest;
    elsewhere None, no limit (a CPU's tiles are in host memory already: parking moves nothing)."""
    if given is not None or device.type != "cuda":
        return given
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int((free + cached) * VAE_DEVICE_PARK_SHARE)


def _lot(vae, tiles: list[Tile], mode: str, need: int, budget: int | None, host_budget: int,
         decoder: bool) -> Lot | None:
    """Where exact mode's paused tiles wait when its working set exceeds the device budget:
    a parking.Lot whose host buffers fit each tile's largest GroupNorm, pinned within the host
    budget. None: every paused tile stays on the device (fits, or no limit), or estimated mode
    (no tile ever waits)."""
    if mode != "exact" or budget is None or need <= budget:
        return None
    device, dtype = _where(vae)
    per_px = peak_elements_per_px(dict(vae.config), decoder) * torch.finfo(dtype).bits // 8
    return Lot(device, budget, lambda i: per_px * tiles[i].window_area, pin_limit=host_budget)


def _parking(lot: Lot | None, budget: int | None) -> dict:
    """The report's parking fields: the budget, whether tiles left the device, bytes each way."""
    if lot is not None:
        lot.close()
    moved = 0 if lot is None else lot.moved
    return dict(device_budget_bytes=budget, parked=moved > 0, parked_bytes=moved)


def _factor(vae) -> int:
    """Image px per latent px (8 for SD VAEs)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _shift(vae):
    return getattr(vae.config, "shift_factor", None)


def _pick_mode(mode, need: int, host_budget: int | None) -> tuple[str, int]:
    """(mode, budget): 'exact' if its working set fits the budget, else 'estimated' (or as forced)."""
    budget = vae_park_budget() if host_budget is None else host_budget
    if mode is None:
        mode = "exact" if need <= budget else "estimated"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    return mode, budget


def _attention(exact: bool, limit: int) -> str:
    """The report's word for the mid-block attention; windows (an approximation) are logged."""
    if not exact:
        log.warning("VAE mid-block attention ran in windows (more than %d tokens): approximate", limit)
    return "exact" if exact else "windowed"


def _resolve_tiling(tile_px, attn_token_limit, height_px: int, width_px: int, device) -> tuple[int, int]:
    """The tile size (given, or chosen for the image) and the global-attention token limit."""
    tile_px = choose_tile_px(height_px, width_px) if tile_px is None else tile_px
    limit = default_token_limit(device) if attn_token_limit is None else attn_token_limit
    return tile_px, limit


def _untiled(result, on_tile) -> tuple[object, TileReport]:
    """An untiled pass's result and report (one 'tile')."""
    if on_tile:
        on_tile(1, 1)
    return result, TileReport(tile_px=0, mode="untiled", tiles=1, attention="exact")


def _window(feat: torch.Tensor, t, origin: int = 0) -> torch.Tensor:
    """The tile's window (1, C, wh, ww) of the latent-resolution map (whose first row is the
    map's row `origin`), contiguous, on the map's device."""
    xs = t.window_slices()[1]
    return feat[:, :, t.y.win0 - origin:t.y.win1 - origin, xs].contiguous()


@dataclass(frozen=True)
class _Share:
    """This process's part of a tiled decode or encode: all of it in one process; over a
    band-parallel group, a run of whole tile rows and the band of latent rows their cores cover."""

    tiles: list[Tile]  # this process's tiles
    total: int  # every process's tiles
    band: tuple[int, int]  # its latent rows [a, b)
    group: object = None  # the parallel.BandGroup sharing it (None: alone; vae never imports parallel)
    comm: object = None  # the communicator of the latent-resolution bands (group.split)
    context: tuple[int, int] = (0, 0)  # rows above / below any band that its tiles' windows read

    @property
    def ranks(self) -> int | None:
        return None if self.group is None else self.group.size


def _share(group, h: int, w: int, tile: int, context: int) -> _Share:
    """This process's share of an h x w latent map in tiles of `tile` latent px: with a group,
    each rank runs its band of the latent-resolution part and the tiles over it."""
    per_rank = rank_tiles(h, w, tile, context, 1 if group is None else group.size)
    if len(per_rank) == 1:  # one process, or fewer latent rows than ranks: every rank runs it all
        return _Share(per_rank[0], len(per_rank[0]), (0, h))
    parts = [band_of(ts) for ts in per_rank]
    context_rows = window_halo([t for ts in per_rank for t in ts], parts)  # the tiles' windows
    return _Share(per_rank[group.rank], sum(map(len, per_rank)), parts[group.rank], group,
                  group.split(parts), context_rows)


def _tiling(vae, h: int, w: int, tile_px: int, mode, context: int, host_budget, group,
            decoder: bool) -> tuple[_Share, str, int, int]:
    """(share, mode, working set, budget): this process's share of a tiled pass over an h x w
    latent, and the statistics mode chosen from its exact working set and the host budget."""
    f, dtype = _factor(vae), _where(vae)[1]
    share = _share(group, h, w, max(1, tile_px // f), context)
    need = exact_working_set(dict(vae.config), width=w * f, height=h * f, tile_px=tile_px,
                             decoder=decoder, itemsize=torch.finfo(dtype).bits // 8,
                             context=context, ranks=share.ranks or 1)
    mode, budget = _pick_mode(mode, need, host_budget)
    return share, mode, need, budget


def _honours_force_upcast(fn):
    """decode/encode of an fp16 VAE whose config sets force_upcast (SD-XL's: its fp16 activations
    overflow at large sizes) run in float32, as diffusers' pipelines do, and the VAE goes back
    to fp16 after; any other VAE runs in its own dtype."""
    @functools.wraps(fn)
    def run(vae, *args, **kwargs):
        upcast = _where(vae)[1] == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        if not upcast:
            return fn(vae, *args, **kwargs)
        vae.to(torch.float32)
        try:
            return fn(vae, *args, **kwargs)
        finally:
            vae.to(torch.float16)
    return run


# ---------------------------------------------------------------- decode
@_honours_force_upcast
def decode(vae, latents: torch.Tensor, *, tile_px: int | None = None, mode: str | None = None,
           on_tile=None, context: int = DECODER_CONTEXT, attn_token_limit: int | None = None,
           stats_px: int = STATS_PX, host_budget: int | None = None,
           on_report: OnReport | None = None, band_rows: int = 0, group=None,
           device_budget: int | None = None) -> np.ndarray:
    """Decode ONE scaled latent (1, 4, h, w) to uint8 (8h, 8w, 3), tiled with shared GN stats
    (band_rows > 0: the whole-latent part band by band, tiled decodes only; group: a
    parallel.BandGroup whose ranks share a tiled decode, see _share; device_budget: device
    bytes exact mode's paused tiles may hold, see _device_budget)."""
    if latents.ndim != 4 or latents.shape[0] != 1:
        raise ValueError(f"decode takes one latent (1, C, h, w), got {tuple(latents.shape)}")
    device, dtype = _where(vae)
    f = _factor(vae)
    z = latents.to(device=device, dtype=dtype) / vae.config.scaling_factor  # (1, 4, h, w)
    if _shift(vae) is not None:
        z = z + _shift(vae)
    h, w = z.shape[-2:]
    tile_px, limit = _resolve_tiling(tile_px, attn_token_limit, h * f, w * f, device)
    with torch.inference_mode():
        if tile_px <= 0:
            zz = vae.post_quant_conv(z) if vae.post_quant_conv is not None else z
            out, report = _untiled(to_uint8(vae.decoder(zz)), on_tile)
        else:
            out, report = _decode_tiled(vae, z, tile_px, mode, on_tile, context, limit, stats_px,
                                        host_budget, band_rows, group, device_budget)
    if on_report:
        on_report(report)
    return out


def _decode_tiled(vae, z, tile_px, mode, on_tile, context, limit, stats_px,
                  host_budget, band_rows=0, group=None,
                  device_budget=None) -> tuple[np.ndarray, TileReport]:
    """The whole-map latent-resolution layers once, then the tiled up path into a uint8 image;
    over a group, each rank its band of both and one all-gather of the image's rows. The
    latent-resolution map waits in host memory during the tiled pass (the planner's estimate
    counts it there: 4 GiB at 16384^2), each window crossing once through runtime.transfer."""
    device, dtype = _where(vae)
    f = _factor(vae)
    h, w = z.shape[-2:]
    decoder_split(vae.decoder)  # refuses decoders the tiled path cannot run
    share, mode, need, budget = _tiling(vae, h, w, tile_px, mode, context, host_budget, group, True)
    (a, b), comm = share.band, share.comm
    feat, exact = decoder_whole(vae, z, limit, band_rows, comm)  # (1, C, b - a, w)
    origin = a
    if comm is not None:  # with the rows above and below that its tiles' windows read
        src = comm.halo(Full(feat), *share.context)
        origin -= src.above
        feat = torch.cat([src.top, feat, src.bottom], dim=2)  # on the device, like the halo rows
        del src
    attention = _attention(exact, limit)
    stats = _decoder_stats(vae, z, stats_px, limit) if mode == "estimated" else None
    parked = device.type != "cpu"  # (1, C, rows, w): off the device while the tiles run
    if parked:
        feat = transfer.to_host(feat)
    budget_d = _device_budget(device, device_budget)
    lot = _lot(vae, share.tiles, mode, need, budget_d, budget, True)
    out = np.empty(((b - a) * f, w * f, 3), dtype=np.uint8)  # this rank's rows of the image

    nonfinite = []  # over a group, a NaN/inf tile is reported after the gather: never between
    # two of the group's messages, where the other ranks would wait for this one

    def write(t, img):  # img: (1, 3, 8 win_h, 8 win_w)
        cy, cx = t.crop_slices(f)
        ys, xs = t.core_slices(f)
        try:
            out[ys.start - a * f:ys.stop - a * f, xs] = to_uint8(img[:, :, cy, cx])
        except NonFiniteError:
            if share.group is None:
                raise
            nonfinite.append(t)

    def start(t, ctx):
        window = _window(feat, t, origin)  # (1, C, win_h, win_w)
        return decoder_tile(vae, transfer.to_device(window, device) if parked else window, ctx)

    rounds = run_tiles(share.tiles, start, write, stats=stats, lot=lot, on_tile=on_tile,
                       group=share.group)
    if comm is not None:  # (8h, 8w, 3) uint8: every rank's rows, each decoded by one rank
        rows = [(p * f, q * f) for p, q in comm.parts]
        out = share.group.gather_rows(torch.from_numpy(out), rows, "vae").numpy()
    if nonfinite:
        raise NonFiniteError("vae")
    return out, TileReport(tile_px, mode, share.total, attention, need, budget, rounds,
                           band_rows or None, share.ranks, **_parking(lot, budget_d))


def _decoder_stats(vae, z: torch.Tensor, long_side: int, limit: int):
    """GroupNorm stats of the tiled decoder path, from an untiled pass over a downscaled latent."""
    h, w = z.shape[-2:]
    sh, sw = downscaled_size(h, w, long_side)
    zs = z if (sh, sw) == (h, w) else F.interpolate(z.float(), size=(sh, sw), mode="area").to(z.dtype)
    feat, _ = decoder_whole(vae, zs, limit)  # (1, C, sh, sw)
    _, record = run_recording(decoder_tile(vae, feat, TileCtx((0, sh, 0, sw), (sh, sw))))
    return record


# ---------------------------------------------------------------- encode
@_honours_force_upcast
def encode(vae, image, *, tile_px: int | None = None, generator: torch.Generator | None = None,
           mode: str | None = None, on_tile=None, context: int = ENCODER_CONTEXT,
           attn_token_limit: int | None = None, stats_px: int = STATS_PX,
           host_budget: int | None = None, on_report: OnReport | None = None,
           band_rows: int = 0, group=None, device_budget: int | None = None) -> torch.Tensor:
    """Encode an image (PIL or uint8 (H, W, 3)) to scaled latents (1, 4, H/8, W/8)
    (band_rows > 0: the whole-latent part band by band, tiled encodes only; device_budget: as
    for decode).

    With a generator, samples the posterior like diffusers' img2img (one noise tensor of the
    full latent shape, so tiled and untiled agree); without one, returns its mean.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    arr = as_uint8_image(image)
    device, dtype = _where(vae)
    f = _factor(vae)
    if arr.shape[0] % f or arr.shape[1] % f:
        raise ValueError(f"image size {arr.shape[1]}x{arr.shape[0]} is not a multiple of {f}")
    tile_px, limit = _resolve_tiling(tile_px, attn_token_limit, arr.shape[0], arr.shape[1], device)
    with torch.inference_mode():
        if tile_px <= 0:
            moments = vae.encoder(preprocess(arr, device, dtype))  # (1, 8, h, w)
            if vae.quant_conv is not None:
                moments = vae.quant_conv(moments)
            moments, report = _untiled(moments, on_tile)
        else:
            moments, report = _encode_tiled(vae, arr, tile_px, mode, on_tile, context, limit,
                                            stats_px, host_budget, band_rows, group, device_budget)
        dist = DiagonalGaussianDistribution(moments)
        lat = dist.sample(generator) if generator is not None else dist.mode()  # (1, 4, h, w)
        if _shift(vae) is not None:
            lat = lat - _shift(vae)
        lat = lat * vae.config.scaling_factor
    if on_report:
        on_report(report)
    return lat


def _encode_tiled(vae, arr, tile_px, mode, on_tile, context, limit, stats_px,
                  host_budget, band_rows=0, group=None,
                  device_budget=None) -> tuple[torch.Tensor, TileReport]:
    """The tiled down path into a latent-resolution map, then the whole-map rest once; over a
    group, each rank its band of both and one all-gather of the (8-channel) moments."""
    device, dtype = _where(vae)
    f = _factor(vae)
    h, w = arr.shape[0] // f, arr.shape[1] // f
    encoder_split(vae.encoder)  # refuses encoders the tiled path cannot run
    share, mode, need, budget = _tiling(vae, h, w, tile_px, mode, context, host_budget, group, False)
    stats = _encoder_stats(vae, arr, stats_px, device, dtype) if mode == "estimated" else None
    budget_d = _device_budget(device, device_budget)
    lot = _lot(vae, share.tiles, mode, need, budget_d, budget, False)
    (a, b), comm = share.band, share.comm
    held: dict[str, torch.Tensor] = {}  # "feat": (1, C, b - a, w), allocated by the first tile

    def start(t, ctx):
        ys, xs = t.window_slices(f)
        return encoder_tile(vae, preprocess(arr[ys, xs], device, dtype), ctx)

    def write(t, x):  # x: (1, C, win_h, win_w)
        if "feat" not in held:
            held["feat"] = torch.empty((1, x.shape[1], b - a, w), dtype=x.dtype, device=device)
        cy, cx = t.crop_slices()
        ys, xs = t.core_slices()
        held["feat"][:, :, ys.start - a:ys.stop - a, xs] = x[:, :, cy, cx]

    rounds = run_tiles(share.tiles, start, write, stats=stats, lot=lot, on_tile=on_tile,
                       group=share.group)
    parking = _parking(lot, budget_d)
    # popped: no reference here, so the banded path frees the map after its first layer
    moments, exact = encoder_whole(vae, held.pop("feat"), limit, band_rows, comm)  # (1, 8, b - a, w)
    if comm is not None:  # every rank's rows: the whole (1, 8, h, w)
        moments = comm.gather(moments[0].transpose(0, 1)).transpose(0, 1)[None].contiguous()
    return moments, TileReport(tile_px, mode, share.total, _attention(exact, limit), need, budget,
                               rounds, band_rows or None, share.ranks, **parking)


def _encoder_stats(vae, arr: np.ndarray, long_side: int, device, dtype):
    """GroupNorm stats of the tiled encoder path, from an untiled pass over a downscaled image."""
    f = _factor(vae)
    h, w = arr.shape[0] // f, arr.shape[1] // f
    sh, sw = downscaled_size(h, w, long_side)
    small = arr if (sh, sw) == (h, w) else np.asarray(
        Image.fromarray(arr).resize((sw * f, sh * f), Image.BOX))
    gen = encoder_tile(vae, preprocess(small, device, dtype), TileCtx((0, sh, 0, sw), (sh, sw)))
    return run_recording(gen)[1]
