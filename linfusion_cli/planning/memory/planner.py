"""Budget -> memory knobs: the fastest plan whose estimated peak fits the device budget.

Every knob keeps the output the same (up to float rounding); they only trade speed for memory.
The estimate itself lives in estimate.py; this module enumerates plans, orders them by a simple
cost model and picks one, or refuses with the smallest budget that would have worked.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace

from ... import figures
from ...errors import PlanError
from . import estimate as est, knob_table as table
from ...models.resolve import bundled_config

GIB = est.GIB
OFFLOADS = table.OFFLOADS
TILE_CHOICES = table.KNOB["vae_tile_px"].choices["cuda"]  # VAE tile px (0 = untiled), loosest first
FF_CHOICES = table.KNOB["ff_chunk"].choices["cuda"]  # feed-forward chunk, tokens
ATTN_CHOICES = table.KNOB["attn_chunk"].choices  # LinFusion chunk per device kind
KNOB_NAMES = table.NAMES
BAND_CHOICES = table.KNOB["band_rows"].choices["cuda"]  # latent rows per band, 0 = off
RETRY_TILE_FLOOR = 64  # px: an out-of-memory retry aimed at the VAE halves its tile down to this
RETRY_TILES = (2048, 1024, 512, 256, 128, 64)  # an untiled VAE's first retry tile: below the image


class BudgetError(PlanError):
    """No plan fits the budget; `needed_bytes` is the smallest estimate of the plans tried."""

    def __init__(self, message: str, needed_bytes: int):
        super().__init__(message)
        self.needed_bytes = needed_bytes

@dataclass(frozen=True)
class MemoryPlan(est.Knobs):
    """A stage's knobs plus the peak they are estimated to give."""

    estimated_peak_gib: float = 0.0
    estimated_host_gib: float = 0.0  # host RAM beside it (memory/host.py), set by the request
    # The tiled VAE's GroupNorm statistics per pass, decided with the plan (memory/fit.vae_modes):
    # "exact" (tiles in lock step, parked in host RAM up to vae_host_gib), "estimated" (from a
    # downscaled pass, flat memory), "untiled"; "" where the stage has no such pass or no plan.
    vae_decode_mode: str = ""
    vae_encode_mode: str = ""
    vae_host_gib: float = 0.0

    def knobs(self) -> est.Knobs:
        """The knobs alone (plans with equal knobs and different estimates compare equal here)."""
        return est.Knobs(**{name: getattr(self, name) for name in KNOB_NAMES})

    def to_dict(self) -> dict:
        """JSON-able record for --dry-run and run metadata."""
        return asdict(self)

    def slowdown(self, width: int = 4096, height: int = 4096) -> float:
        """Relative stage time against the plan with every knob off: the knob table's candidate
        order (fixed factors, not measured; a priced plan is ranked by the ledger instead)."""
        return table.order(asdict(self.knobs()), max(width, height))

    def tighter(self, device: str = "cuda", phase: str | None = None,
                long_side: int | None = None, banded: bool = False) -> MemoryPlan | None:
        """The next tighter plan for an out-of-memory retry, or None when all knobs are on.

        phase: aim at the part that ran out ("unet", "vae_decode", "vae_encode"): only the
        knobs that lower that part's peak; None: any knob. long_side: the stage's longest
        side in px (an untiled VAE then gets its first tile below it). banded: the UNet runs
        band-wise whatever band_rows says (band parallelism), so never sequential offload, whose
        per-layer hooks the bands would bypass. The estimate is carried
        over as an upper bound (the new plan needs at most as much).
        """
        unet = phase in (None, "unet")
        steps = []
        if unet and self.ff_chunk != FF_CHOICES[-1]:
            steps.append({"ff_chunk": FF_CHOICES[FF_CHOICES.index(self.ff_chunk) + 1]
                          if self.ff_chunk in FF_CHOICES else FF_CHOICES[-1]})
        if not self.inplace:  # SiLU in place: the UNet's and the VAE's
            steps.append({"inplace": True})
        if phase is None and self.vae_tile_px != TILE_CHOICES[-1]:
            steps.append({"vae_tile_px": 2048 if not self.vae_tile_px
                          else max(TILE_CHOICES[-1], self.vae_tile_px // 2)})
        elif phase is not None and not unet:
            tile = self._smaller_tile(long_side)
            if tile is not None:  # first: the tile is what the VAE's peak scales with
                steps.insert(0, {"vae_tile_px": tile})
        if unet and not self.cfg_split:
            steps.append({"cfg_split": True})
        smallest_chunk = ATTN_CHOICES[figures.device_kind(device)][-1]
        if unet and self.attn_chunk and self.attn_chunk > smallest_chunk:
            steps.append({"attn_chunk": smallest_chunk})
        if unet and self.attn_chunk and not table.excluded(self.offload, banded=True):  # bands possible
            if not self.band_rows:
                steps.append({"band_rows": 64})
            elif self.band_rows > BAND_CHOICES[-1]:
                steps.append({"band_rows": max(BAND_CHOICES[-1], self.band_rows // 2)})
        if device == "cuda":
            if unet and not self.skips_on_cpu:
                steps.append({"skips_on_cpu": True})
            if self.offload == "none" or (unet and self.offload == "model" and not table.excluded(
                    "sequential", banded=bool(self.band_rows) or banded)):
                # the VAE's retry: the other models' weights off the device while it runs
                steps.append({"offload": OFFLOADS[OFFLOADS.index(self.offload) + 1]})
        return replace(self, **steps[0]) if steps else None

    def _smaller_tile(self, long_side: int | None) -> int | None:
        """The VAE tile of a retry aimed at the VAE: an untiled VAE's first tile below the
        image's longest side, else half the tile, down to RETRY_TILE_FLOOR px; None at the floor."""
        if not self.vae_tile_px:
            below = [t for t in RETRY_TILES if long_side is None or t < long_side]
            return below[0] if below else None
        half = self.vae_tile_px // 2 // 8 * 8
        return half if half >= RETRY_TILE_FLOOR else None


def load_family_configs(family: str) -> tuple[dict, dict]:
    """(unet_config, vae_config) of a bundled family, with no download."""
    return bundled_config(family, "unet"), bundled_config(family, "vae")


def candidate_plans(width: int, height: int, *, guidance: bool = True, linfusion: bool = True,
                    device: str = "cuda", fixed: dict | None = None) -> list[MemoryPlan]:
    """Every meaningful knob combination, fastest first (a total order: ties by knob values).

    `fixed` holds knobs the user or the preset forced ({"vae_tile_px": 0, ...}): only plans
    with those values are candidates, so the estimate printed is the one of the plan that runs.
    On the CPU, VAE tiles are at most figures.CPU_VAE_TILE and offload/skips_on_cpu are moot.
    """
    cuda = device == "cuda"
    long_side = max(width, height)
    tiles = [t for t in TILE_CHOICES if t == 0 or t < long_side]
    if not cuda:
        tiles = [t for t in tiles if (t or long_side) <= figures.CPU_VAE_TILE] or [figures.CPU_VAE_TILE]
    fixed = fixed or {}
    unknown = set(fixed) - set(KNOB_NAMES)
    if unknown:
        raise PlanError(f"unknown memory knob(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(KNOB_NAMES)}")
    choices = {k.name: k.choices[figures.device_kind(device)] for k in table.KNOBS}
    choices["vae_tile_px"] = tiles  # tiles smaller than the image
    if not guidance:
        choices["cfg_split"] = (False,)
    if not linfusion:
        choices["attn_chunk"] = choices["band_rows"] = (0,)
    choices["band_rows"] = tuple(b for b in choices["band_rows"] if b < -(-height // 8))
    if fixed.get("band_rows") and not linfusion:
        raise PlanError("band_rows needs LinFusion (softmax self-attention does not split into bands)")
    if fixed.get("band_rows") and table.excluded(fixed.get("offload", "none"), banded=True):
        raise PlanError(table.excluded(fixed["offload"], banded=True))
    for name, value in fixed.items():  # a forced knob has exactly one choice
        choices[name] = (value,)
    plans = [MemoryPlan(*c) for c in itertools.product(*(choices[n] for n in KNOB_NAMES))]
    plans = [p for p in plans if not table.excluded(p.offload, banded=bool(p.band_rows))]
    return sorted(plans, key=lambda p: (round(p.slowdown(width, height), 9),
                                        OFFLOADS.index(p.offload), -p.vae_tile_px, p.ff_chunk,
                                        p.cfg_split, p.attn_chunk, p.inplace, p.skips_on_cpu,
                                        p.band_rows))


class _Estimator:
    """Memoised estimate of many plans for one stage (the UNet and VAE parts are shared)."""

    def __init__(self, unet_config, vae_config, *, width, height, dtype_bytes, guidance,
                 linfusion, device, text_encoders_bytes=None, vae_bytes=None, dilated_pass=False,
                 unet_extra=None, world_size=1):
        self.u, self.v = unet_config, vae_config
        # band parallelism: the UNet's activations are one rank's band of rows (plus halos)
        self.unet_h, self.gathered = est.rank_latent_rows(unet_config, -(-height // 8), world_size), 0
        if world_size > 1:
            self.gathered = est.gathered_bytes(unet_config, latent_h=-(-height // 8),
                                               latent_w=-(-width // 8), dtype_bytes=dtype_bytes,
                                               batch=2 if guidance else 1)
        self.extra = (est.dilated_pass_bytes(unet_config, latent_h=-(-height // 8),
                                             latent_w=-(-width // 8)) if dilated_pass else 0)
        self.unet_extra = unet_extra  # knobs -> bytes more while the UNet runs (ControlNets)
        self.w, self.h, self.db, self.ranks = width, height, dtype_bytes, world_size
        self.batch = 2 if guidance else 1
        self.linfusion, self.device = linfusion, device
        self.weights = est.weight_bytes(unet_config, vae_config, dtype_bytes, text_encoders_bytes,
                                        vae_bytes)
        self.vae_bytes = est.vae_dtype_bytes(dtype_bytes, vae_bytes)
        self.layer = est.layer_bytes(unet_config, dtype_bytes)
        self._unet: dict = {}
        self._vae: dict = {}

    def __call__(self, plan: MemoryPlan) -> int:
        k = plan.knobs()
        ukey = (k.ff_chunk, k.cfg_split, k.attn_chunk, k.inplace, k.skips_on_cpu, k.band_rows)
        if ukey not in self._unet:
            self._unet[ukey] = est.unet_activation_bytes(
                self.u, latent_h=self.unet_h, latent_w=-(-self.w // 8), batch=self.batch,
                dtype_bytes=self.db, knobs=k, linfusion=self.linfusion,
                banded=self.ranks > 1) + self.extra + self.gathered  # over ranks: always band-wise
            if self.unet_extra is not None:
                self._unet[ukey] += self.unet_extra(k)
        vkey = (k.vae_tile_px, k.band_rows)
        if vkey not in self._vae:
            self._vae[vkey] = est.vae_activation_bytes(
                self.v, height=self.h, width=self.w, tile_px=k.vae_tile_px,
                dtype_bytes=self.vae_bytes, band_rows=k.band_rows,
                token_limit=figures.VAE_ATTN_TOKEN_LIMIT[figures.device_kind(self.device)],
                ranks=self.ranks)
        return est.stage_peak(self.weights, self._unet[ukey], self._vae[vkey],
                              offload=k.offload, device=self.device, layer_bytes=self.layer)


# Each knob's values, loosest (most memory, least work) first: a plan one step looser in any
# knob needs at least as much memory and at most as much time (the frontier below rests on it).
LOOSEST_FIRST = {k.name: k.loosest_first() for k in table.KNOBS}


def _looser(plan: MemoryPlan):
    """The plans looser than `plan` in one knob (as knob tuples), every looser value of it: the
    table lists every device's values, so the nearest may not be a choice on this one."""
    k = plan.knobs()
    for name in KNOB_NAMES:
        order = LOOSEST_FIRST[name]
        value = getattr(k, name)
        for looser in order[:order.index(value) if value in order else 0]:
            yield replace(k, **{name: looser})


def frontier(fitting: list[MemoryPlan]) -> list[MemoryPlan]:
    """The fitting plans no single knob of which can be loosened and still fit: every faster
    fitting plan is one of them or looser than one (memory is monotone in each knob)."""
    fits = {p.knobs() for p in fitting}
    return [p for p in fitting if not any(q in fits for q in _looser(p))]


def choose_knobs(unet_config: dict, vae_config: dict, *, width: int, height: int,
                dtype_bytes: int, budget_bytes: int, guidance: bool = True,
                linfusion: bool = True, device: str = "cuda",
                text_encoders_bytes: int | None = None, vae_bytes: int | None = None,
                fixed: dict | None = None, dilated_pass: bool = False,
                unet_extra=None, host_fits=None, world_size: int = 1,
                price=None) -> MemoryPlan:
    """The fastest plan whose estimated peak fits budget_bytes; BudgetError with the minimum if none.
    price: plan -> predicted seconds of the stage (planning/cost.py through a ledger); with it,
    the fitting plans of the frontier are priced and the fastest wins (ties: candidate order);
    without it (plans for the CPU, no GPU model), the first fitting plan in candidate order.
    dilated_pass: the stage is a DemoFusion one (est.dilated_pass_bytes more while the UNet runs).
    unet_extra: knobs -> bytes added to the UNet's activations (a ControlNet step's excess).
    host_fits: plan -> whether its host memory fits this machine; the fastest plan that fits both
    wins, else the fastest that fits the GPU (whose host need the caller then refuses).
    world_size > 1: one rank's share under band parallelism (its rows of every UNet map and of
    the tiled VAE's latent-resolution maps; its tiles are as large or thinner), without
    sequential offload."""
    estimate = _Estimator(unet_config, vae_config, width=width, height=height,
                          dtype_bytes=dtype_bytes, guidance=guidance, linfusion=linfusion,
                          device=device, text_encoders_bytes=text_encoders_bytes,
                          vae_bytes=vae_bytes, dilated_pass=dilated_pass, unet_extra=unet_extra,
                          world_size=world_size)
    smallest, fitting = None, []
    for plan in candidate_plans(width, height, guidance=guidance, linfusion=linfusion,
                                device=device, fixed=fixed):
        if world_size > 1 and table.excluded(plan.offload, banded=True):  # a group runs band-wise
            continue
        peak = estimate(plan)
        if peak <= budget_bytes:
            fitting.append(replace(plan, estimated_peak_gib=round(peak / GIB, 2)))
            if price is None and host_fits is None:
                break  # the first fitting plan wins: no need to estimate the rest
        smallest = peak if smallest is None else min(smallest, peak)
    if fitting:
        on_host = [p for p in fitting if host_fits is None or host_fits(p)] or fitting
        if price is None:
            return on_host[0]
        ranked = frontier(on_host)
        return min(ranked, key=lambda p: (price(p), ranked.index(p)))
    forced = f" with {', '.join(f'{k}={v}' for k, v in fixed.items())}" if fixed else ""
    raise BudgetError(
        f"needs at least {smallest / GIB:.1f} GiB for {width}x{height} with the tightest plan"
        f"{forced}; the budget is {budget_bytes / GIB:.3g} GiB", smallest)
