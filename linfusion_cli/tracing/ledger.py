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
digest, the geometry, the knobs that change the count and a digest of this package's source.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .. import __version__, parallel
from ..models.loading import cache_dir
from ..pipeline.knobs import apply_knobs
from .. import vae as tiled_vae
from ..planning.budget import GIB, vae_device_budget
from ..planning.cost import Cost
from ..planning.memory.knob_table import part_knobs
from ..figures import VAE_ATTN_TOKEN_LIMIT
from ..parallel.traffic import CountingGroup, ring_bytes
from ..runtime import transfer
from .unet import _inputs, meta_unet, meta_vae

UNET_KNOBS = part_knobs("unet")  # the knobs that change a UNet call's count


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


def busiest_rank(latent_h: int, levels: int, world_size: int) -> int:
    """The rank with the most full-resolution rows (ties: an inner one, with two neighbours)."""
    rows = [b - a for a, b in parallel.bands(latent_h, levels, world_size)[0]]
    inner = lambda r: 0 < r < world_size - 1
    return max(range(world_size), key=lambda r: (rows[r], inner(r), -r))


def _peers(group) -> Cost:
    """What a counting group saw: the bytes a rank puts on the wire (ring collectives) and its
    messages."""
    if group is None:
        return Cost()
    return Cost(link_bytes=sum(ring_bytes(group.sent, group.size).values()), messages=group.messages)


def unet_call_cost(unet, *, width: int, height: int, knobs, batch: int = 2,
                   dtype: torch.dtype = torch.float16, world_size: int = 1,
                   rank: int | None = None) -> Cost:
    """One UNet forward at (width, height) px under `knobs` (a MemoryPlan), counted directly;
    world_size > 1: the forward of one rank (default: the busiest) of a band-parallel group,
    every message counted and none sent (parallel/traffic.CountingGroup)."""
    group = None
    if world_size > 1:
        levels = len(unet.config.block_out_channels) - 1
        rank = busiest_rank(-(-height // 8), levels, world_size) if rank is None else rank
        group = CountingGroup(rank, world_size, "meta")
    undo = apply_knobs(unet, None, knobs, group)  # a group's UNet runs band-wise
    try:
        with counting() as tally:
            sample, t, context, kwargs = _inputs(unet, batch, -(-height // 8), -(-width // 8), dtype)
            unet(sample, t, encoder_hidden_states=context, **kwargs)
        return tally.cost() + _peers(group)
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


@lru_cache(maxsize=4)
def _meta_unet(config_json: str, linfusion: bool, dtype: torch.dtype):
    """One meta UNet per config in a process (building one takes seconds; it holds no memory)."""
    return meta_unet(json.loads(config_json), linfusion=linfusion, dtype=dtype)


class UnetLedger:
    """Costs of one UNet config's calls, memoised (process and disk): a Ledger's UNet phase."""

    def __init__(self, unet_config: dict, *, linfusion: bool, dtype: torch.dtype = torch.float16,
                 cache: Path | None = None):
        self.config, self.linfusion, self.dtype = unet_config, linfusion, dtype
        self.store = _Store(cache)

    def _model(self):
        return _meta_unet(json.dumps(self.config, sort_keys=True), self.linfusion, self.dtype)

    def __call__(self, width: int, height: int, knobs, batch: int, world_size: int = 1) -> Cost:
        key = _digest({"v": __version__, "config": self.config, "linfusion": self.linfusion,
                       "dtype": str(self.dtype), "w": -(-width // 8), "h": -(-height // 8),
                       "batch": batch, "knobs": {k: getattr(knobs, k) for k in UNET_KNOBS},
                       "ranks": world_size})
        return self.store.get(key, lambda: self._count(width, height, knobs, batch, world_size))

    def _count(self, width: int, height: int, knobs, batch: int, world_size: int) -> Cost:
        def count(rows: int) -> Cost:
            return unet_call_cost(self._model(), width=width, height=rows * 8, knobs=knobs,
                                  batch=batch, dtype=self.dtype, world_size=world_size)
        if world_size > 1:  # a rank's band: a few bands per level, counted directly
            return count(-(-height // 8))
        return extrapolated(count, -(-height // 8), band_period(self.config, knobs, width))


class VaeLedger:
    """Costs of one VAE config's tiled decode and encode: the real vae.decode / vae.encode run
    on the meta device at full size under the plan's tile, bands, statistics mode and budgets
    (what pipeline/context.vae_plan hands them), memoised like UnetLedger."""

    def __init__(self, vae_config: dict, *, dtype: torch.dtype = torch.bfloat16,
                 cache: Path | None = None, budget_bytes: int | None = None, world_size: int = 1):
        self.config, self.dtype, self.world_size = vae_config, dtype, world_size
        self.budget_bytes = budget_bytes  # the plan's device budget (paused tiles' share of it)
        self.store = _Store(cache)

    def __call__(self, width: int, height: int, plan, *, decoder: bool) -> Cost:
        mode = getattr(plan, f"vae_{'decode' if decoder else 'encode'}_mode") or "estimated"  # a MemoryPlan's
        device = None if mode != "exact" else vae_device_budget(self.budget_bytes, plan.estimated_peak_gib)
        args = {"tile_px": plan.vae_tile_px, "band_rows": plan.band_rows,
                "mode": mode if plan.vae_tile_px else None, "device_budget": device,
                "host_budget": int(plan.vae_host_gib * GIB) or None}
        key = _digest({"v": __version__, "vae": self.config, "dtype": str(self.dtype), "w": width,
                       "h": height, "decoder": decoder, "ranks": self.world_size, **args})
        return self.store.get(key, lambda: vae_pass_cost(self.config, width, height, decoder=decoder,
                                                         dtype=self.dtype, world_size=self.world_size,
                                                         **args))


def vae_pass_cost(vae_config: dict, width: int, height: int, *, decoder: bool,
                  dtype: torch.dtype = torch.bfloat16, world_size: int = 1, **plan) -> Cost:
    """One decode of a (width, height) image's latent, or one encode of the image, counted;
    world_size > 1: an inner rank's share of it (two neighbours: the most halo rows)."""
    vae = _meta_vae(json.dumps(vae_config, sort_keys=True), dtype)
    f = 2 ** (len(vae_config["block_out_channels"]) - 1)
    token_limit = VAE_ATTN_TOKEN_LIMIT["cuda"]
    group = CountingGroup(world_size // 2, world_size, "meta") if world_size > 1 else None
    plan["group"] = group
    with counting() as tally:
        if decoder:
            latent = torch.empty(1, vae_config.get("latent_channels", 4), height // f, width // f,
                                 device="meta")
            tiled_vae.decode(vae, latent, attn_token_limit=token_limit, **plan)
        else:
            image = np.zeros((height, width, 3), dtype=np.uint8)  # untouched pages: no memory
            tiled_vae.encode(vae, image, attn_token_limit=token_limit, **plan)
    return tally.cost() + _peers(group)


@lru_cache(maxsize=4)
def _meta_vae(config_json: str, dtype: torch.dtype):
    return meta_vae(json.loads(config_json), dtype)


@lru_cache(maxsize=1)
def _code_digest() -> str:
    """A digest of this package's source: a cached count is dropped when the code it counted changes."""
    h = hashlib.sha1()
    for path in sorted(Path(__file__).resolve().parents[1].rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()


def _digest(parts: dict) -> str:
    parts = {**parts, "code": _code_digest()}
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class _Store:
    """Counts memoised in the process and, with a folder, on disk (one small JSON file each)."""

    def __init__(self, folder: Path | None):
        self.folder, self.memo = folder, {}

    def get(self, key: str, count) -> Cost:
        if key not in self.memo:
            self.memo[key] = self._load(key) or count()
            self._save(key, self.memo[key])
        return self.memo[key]

    def _load(self, key: str) -> Cost | None:
        if self.folder is None:
            return None
        try:
            return Cost(**json.loads((self.folder / f"{key}.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _save(self, key: str, cost: Cost) -> None:
        if self.folder is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{key}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(cost.to_dict()))
            os.replace(tmp, self.folder / f"{key}.json")
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
                             cache=cache, budget_bytes=plan.budget.bytes if plan.budget else None,
                             world_size=plan.world_size)
        self.world_size = plan.world_size

    def __call__(self, phase: str, width: int, height: int, plan, guidance: bool) -> Cost:
        if phase == "unet":
            return self.unet(width, height, plan, 2 if guidance else 1, self.world_size)
        return self.vae(width, height, plan, decoder=phase == "vae_decode")


def ledger_for(plan) -> PlanLedger:
    """The ledger a plan is priced with, its counts cached beside the demo model."""
    return PlanLedger(plan, cache_dir() / "ledger")

