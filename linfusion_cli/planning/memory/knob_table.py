"""The memory knobs, declared once: what each may be on each device, loosest first, which part
of a stage it shapes, what a preset may set it to, the dry run's words for it, its place in the
candidate order, and the one rule that excludes a combination.

Everything else derives from this table: the Knobs dataclass (walk.py), the planner's choices,
loosening order and candidate order (planner.py), the preset's `memory:` rules (presets.py),
the dry run's memory line (planning/plan_text.py), the knobs the ledger and the out-of-memory re-plan
key by part (tracing/ledger.py, planning/replan.py). A new knob is one entry here, its
estimate (walk.py) and its code (pipeline/knobs.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ... import figures, validate

OFFLOADS = ("none", "model", "sequential")
TOKENS_MAX = (validate.MAX_SIDE // 8) ** 2  # latent tokens of the largest image
# Candidate order where no GPU model prices the plans (the CPU, an unnamed GPU absent here):
# a relative stage time per setting, multiplied together; only the order matters
_OFFLOAD_ORDER = {"none": 1.0, "model": 1.12, "sequential": 3.0}  # PCIe traffic per step
# more, smaller kernels (8192 is the CPU's cache-sized default, no slower there)
_CHUNK_ORDER = {0: 1.0, 65536: 1.0, 16384: 1.01, 8192: 1.0, 4096: 1.03}
_VAE_SHARE = 0.1  # share of a stage's time spent in the VAE


@dataclass(frozen=True)
class Knob:
    """One memory knob: it trades speed for peak memory and never changes the image."""

    name: str
    kind: type  # bool, int or str
    default: object  # off
    choices: dict  # device kind ("cuda", "cpu") -> the values planned, loosest (most memory) first
    part: str  # whose peak it shapes: "unet", "vae" or "both" (the ledger's and re-plan's keys)
    rule: str  # what a preset's `memory:` may set it to, in words
    allowed: Callable[[object], bool]  # that rule (the type is checked before)
    words: Callable[[object], str]  # the dry run's words for a value ("" when off)
    order: Callable[[object, int], float]  # candidate-order factor of a value (long side in px)

    def loosest_first(self) -> tuple:
        """Every value planned on any device and off, loosest first: off, then the larger a
        chunk, tile or band the looser; offload in OFFLOADS' order."""
        values = {self.default, *self.choices["cuda"], *self.choices["cpu"]}
        if self.kind is str:
            return tuple(v for v in OFFLOADS if v in values)
        return tuple(sorted(values, key=lambda v: (bool(v), -int(v) if self.kind is int else v)))


def _tile_order(tile: int, long_side: int) -> float:
    if not tile or tile >= long_side:
        return 1.0
    pad = (tile + 2 * figures.DECODER_CONTEXT * 8) ** 2 / tile ** 2  # context recomputed per tile
    return 1 + _VAE_SHARE * (pad - 1)


def _flag(name: str, part: str, cost: float, cpu: tuple = (False, True)) -> Knob:
    """An on/off knob: off is loosest."""
    return Knob(name, bool, False, {"cuda": (False, True), "cpu": cpu}, part, "true or false",
                lambda v: True, lambda v: name if v else "", lambda v, side: cost if v else 1.0)


KNOBS: tuple[Knob, ...] = (
    Knob("offload", str, "none", {"cuda": OFFLOADS, "cpu": ("none",)}, "both",
         "none, model or sequential", lambda v: v in OFFLOADS,
         lambda v: f"offload={v}" if v != "none" else "", lambda v, side: _OFFLOAD_ORDER[v]),
    Knob("vae_tile_px", int, 0, {"cuda": (0, 4096, 2048, 1024, 512),
                                 "cpu": (0, 4096, 2048, 1024, 512)}, "vae",  # CPU: see planner
         f"0 or a multiple of 8 from {validate.MIN_VAE_TILE} up to {validate.MAX_SIDE}",
         lambda v: 0 <= v <= validate.MAX_SIDE and not v % 8 and not 0 < v < validate.MIN_VAE_TILE,
         lambda v: f"vae_tile={v}" if v else "vae untiled", _tile_order),
    Knob("ff_chunk", int, 0, {"cuda": (0, 16384, 4096), "cpu": (0, 16384, 4096)}, "unet",
         f"tokens in [0, {TOKENS_MAX}]", lambda v: 0 <= v <= TOKENS_MAX,
         lambda v: f"ff_chunk={v}" if v else "", lambda v, side: _CHUNK_ORDER.get(v, 1.05)),
    _flag("cfg_split", "unet", 1.06),  # two half batches use the GPU less well
    # LinFusion chunk, tokens: always explicit, so the estimate models what runs (the layer's
    # own default first); 0 only without LinFusion
    Knob("attn_chunk", int, 0, {"cuda": (figures.LINFUSION_DEFAULT_CHUNK["cuda"], 16384, 4096),
                                "cpu": (figures.LINFUSION_DEFAULT_CHUNK["cpu"], 4096)}, "unet",
         f"tokens in [1, {TOKENS_MAX}]", lambda v: 1 <= v <= TOKENS_MAX,
         lambda v: f"attn_chunk={v}" if v else "", lambda v, side: _CHUNK_ORDER.get(v, 1.05) ** 0.5),
    _flag("inplace", "both", 1.001),  # in-place SiLU: free, but only used when needed
    # UNet skips parked in host memory: they cross PCIe twice per step (moot on the CPU)
    _flag("skips_on_cpu", "unet", 1.08, cpu=(False,)),
    # band-wise UNet: latent rows per band at full resolution (halved per level), 0 = off;
    # GroupNorm moments, halo rows, smaller kernels
    Knob("band_rows", int, 0, {"cuda": (0, 256, 128, 64, 32, 16), "cpu": (0, 256, 128, 64, 32, 16)},
         "unet", "latent rows per band, 0 (off) .. 4096", lambda v: 0 <= v <= 4096,
         lambda v: f"band_rows={v}" if v else "", lambda v, side: 1.05 + 1 / v if v else 1.0),
)
KNOB = {k.name: k for k in KNOBS}
NAMES = tuple(KNOB)


def part_knobs(part: str) -> tuple[str, ...]:
    """The knobs that shape only `part`'s peak ("unet" or "vae")."""
    return tuple(k.name for k in KNOBS if k.part == part)


def excluded(offload: str, banded: bool) -> str | None:
    """The one combination no plan may have, in words (None: allowed): a band-wise UNet (band
    rows, or band parallelism, which always runs band-wise) reads its weights directly, past the
    per-layer hooks of sequential offload."""
    if banded and offload == "sequential":
        return ("band-wise UNet (band_rows, or band parallelism) does not combine with sequential "
                "offload: the bands read the weights directly; use offload: model")
    return None


def order(values: dict, long_side: int) -> float:
    """A plan's place in the candidate order: the product of its knobs' factors."""
    cost = 1.0
    for knob in KNOBS:
        cost *= knob.order(values[knob.name], long_side)
    return cost


def words(values: dict) -> list[str]:
    """The dry run's words for a plan's knobs, in table order (the knobs that are on)."""
    return [w for w in (k.words(values[k.name]) for k in KNOBS) if w]
