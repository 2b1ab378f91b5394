"""The cost ledger: FLOPs, PCIe bytes, launches and host syncs of the real forward, at full size,
counted on the meta device in seconds (the memory trace's twin, tracing/unet.py).

The model is built from its config on meta, LinFusion mounted and the plan's knobs applied with
the code a run uses; the forward runs under three counters at once:
- torch's FlopCounterMode (conv, mm, bmm, SDPA FLOPs);
- a dispatch mode counting non-view aten ops (kernel launches, a fair proxy) and
  `_local_scalar_dense` calls (a host sync: `.item()`, `bool(t)`);
- runtime/transfer.py's observers: every byte the package moves between host and device goes
  through that one door, and whether the copy blocked the host (that blocking counts as a sync).

Speed: a band-wise forward's op count grows with its bands, so a tall map is counted at two
short heights whose band structure repeats (2P and 4P latent rows, P the band period) and
extrapolated linearly in the height: every count is affine in the number of bands, exact for
heights that are multiples of P (tests/tracing/test_ledger.py holds extrapolated == direct).
Counts are memoised per process and on disk (the cache folder's ledger/), keyed by the config's
digest, the geometry, the knobs that change the count and this package's version.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .. import __version__
from ..models.loading import cache_dir
from ..pipeline.knobs import apply_knobs
from ..planning.cost import Cost
from ..runtime import transfer
from .unet import _inputs, meta_unet

UNET_KNOBS = ("ff_chunk", "cfg_split", "attn_chunk", "band_rows", "skips_on_cpu")


class _Ops(TorchDispatchMode):
    """Counts non-view aten ops (launches) and scalar reads (host syncs)."""

    def __init__(self) -> None:
        super().__init__()
        self.launches = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        elif not func.is_view:
            self.launches += 1
        return func(*args, **(kwargs or {}))


@dataclass
class Tally:
    """What one counted block did; `cost()` once it has ended."""

    flops: FlopCounterMode = field(default_factory=lambda: FlopCounterMode(display=False))
    ops: _Ops = field(default_factory=_Ops)
    h2d: int = 0
    d2h: int = 0
    blocking: int = 0
    blocking_copies: int = 0

    def copy(self, direction: str, nbytes: int, blocking: bool) -> None:
        if direction == "h2d":
            self.h2d += nbytes
        else:
            self.d2h += nbytes
        if blocking:
            self.blocking += nbytes
            self.blocking_copies += 1

    def cost(self) -> Cost:
        counts = self.flops.get_flop_counts().get("Global", {})
        conv = sum(n for op, n in counts.items() if "convolution" in str(op))
        return Cost(flops=self.flops.get_total_flops(), conv_flops=conv, h2d_bytes=self.h2d,
                    d2h_bytes=self.d2h, blocking_bytes=self.blocking,
                    launches=self.ops.launches, syncs=self.ops.syncs + self.blocking_copies)


@contextmanager
def counting():
    """Count everything the block does (inference mode): yields a Tally."""
    tally = Tally()
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        stack.enter_context(tally.flops)
        stack.enter_context(tally.ops)
        stack.enter_context(transfer.observed(tally.copy))
        yield tally


def unet_call_cost(unet, *, width: int, height: int, knobs, batch: int,
                   dtype: torch.dtype = torch.float16) -> Cost:
    """One UNet forward at (width, height) px under `knobs` (a MemoryPlan), counted directly."""
    undo = apply_knobs(unet, None, knobs)
    try:
        with counting() as tally:
            sample, t, context, kwargs = _inputs(unet, batch, -(-height // 8), -(-width // 8), dtype)
            unet(sample, t, encoder_hidden_states=context, **kwargs)
        return tally.cost()
    finally:
        undo()


def band_period(unet_config: dict, knobs, width: int) -> int:
    """Latent rows after which a forward's structure repeats: every level's bands whole and,
    on a whole map, every level's token count a multiple of the feed-forward and LinFusion
    chunks (so chunk counts grow in step with the height)."""
    depth = len(unet_config["block_out_channels"]) - 1
    if knobs.band_rows:
        return max(knobs.band_rows, 1 << depth)
    chunks = [c for c in (knobs.ff_chunk, knobs.attn_chunk) if c]
    lw = -(-width // 8)
    period = 1 << depth
    while any((period >> lv) * -(-lw // (1 << lv)) % c for c in chunks for lv in range(depth + 1)):
        period += 1 << depth
        if period > 1 << 16:
            break
    return period


def extrapolated(count, height_rows: int, period: int) -> Cost:
    """count(rows) at height_rows latent rows, from counts at 2P and 4P rows (affine in rows)
    when the map is taller than 4P; directly otherwise."""
    if height_rows <= 4 * period:
        return count(height_rows)
    lo, hi = count(2 * period), count(4 * period)
    k = (height_rows - 2 * period) / (2 * period)
    return lo + Cost(*(round((getattr(hi, f) - getattr(lo, f)) * k) for f in Cost.__dataclass_fields__))


class UnetLedger:
    """Costs of one UNet config's calls, memoised (process and disk): a Ledger's UNet phase."""

    def __init__(self, unet_config: dict, *, linfusion: bool, dtype: torch.dtype = torch.float16,
                 cache: Path | None = None):
        self.config, self.linfusion, self.dtype = unet_config, linfusion, dtype
        self.cache = cache
        self._unet = None
        self._memo: dict = {}

    def _model(self):
        if self._unet is None:
            self._unet = meta_unet(self.config, linfusion=self.linfusion, dtype=self.dtype)
        return self._unet

    def key(self, width: int, height: int, knobs, batch: int) -> str:
        parts = {"v": __version__, "config": self.config, "linfusion": self.linfusion,
                 "dtype": str(self.dtype), "w": -(-width // 8), "h": -(-height // 8), "batch": batch,
                 "knobs": {k: getattr(knobs, k) for k in UNET_KNOBS}}
        return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def __call__(self, width: int, height: int, knobs, batch: int) -> Cost:
        key = self.key(width, height, knobs, batch)
        if key not in self._memo:
            self._memo[key] = self._load(key) or self._count(width, height, knobs, batch)
            self._store(key, self._memo[key])
        return self._memo[key]

    def _count(self, width: int, height: int, knobs, batch: int) -> Cost:
        def count(rows: int) -> Cost:
            return unet_call_cost(self._model(), width=width, height=rows * 8, knobs=knobs,
                                  batch=batch, dtype=self.dtype)
        return extrapolated(count, -(-height // 8), band_period(self.config, knobs, width))

    def _load(self, key: str) -> Cost | None:
        path = None if self.cache is None else self.cache / f"{key}.json"
        try:
            return Cost(**json.loads(path.read_text())) if path is not None else None
        except (OSError, ValueError, TypeError):
            return None

    def _store(self, key: str, cost: Cost) -> None:
        if self.cache is None:
            return
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            tmp = self.cache / f".{key}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(cost.to_dict()))
            os.replace(tmp, self.cache / f"{key}.json")
        except OSError:
            pass  # a cache that cannot be written only costs a recount


class PlanLedger:
    """A planning.cost.Ledger for one plan's models: each phase counted from the real code once
    per (geometry, knobs that change it), handed to the planner by api.plan_request."""

    def __init__(self, plan, cache: Path | None = None):
        info = plan.model_info
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
        self.unet = UnetLedger(info.unet_config, linfusion=plan.linfusion is not None,
                               dtype=dtype.get(plan.dtype, torch.float16), cache=cache)
        self.vae = VaeLedger(info.vae_config, dtype=dtype.get(plan.vae_dtype, torch.bfloat16),
                             cache=cache)
        self.world_size = plan.world_size

    def __call__(self, phase: str, width: int, height: int, plan, guidance: bool) -> Cost:
        if phase == "unet":
            return self.unet(width, height, plan, 2 if guidance else 1)
        return self.vae(width, height, plan, decoder=phase == "vae_decode")


def ledger_for(plan) -> PlanLedger:
    """The ledger a plan is priced with, its counts cached beside the demo model."""
    return PlanLedger(plan, cache_dir() / "ledger")


class VaeLedger:
    """Costs of one VAE config's tiled decode and encode (filled in below)."""

    def __init__(self, vae_config: dict, *, dtype: torch.dtype = torch.bfloat16,
                 cache: Path | None = None):
        self.config, self.dtype, self.cache = vae_config, dtype, cache

    def __call__(self, width: int, height: int, plan, *, decoder: bool) -> Cost:
        return Cost()
