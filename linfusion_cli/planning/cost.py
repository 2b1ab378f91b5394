"""What a phase of a stage costs, counted from the real code (tracing/ledger.py counts it), and
a stage's whole cost: its UNet calls, VAE passes and the weights that offload moves.

The planner never imports the counting code (it sits above, in tracing/): whoever plans hands
it a `Ledger`, a callable (phase, stage geometry, knobs) -> Cost, as an argument.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Protocol

from ..gpus import Gpu, predict


@dataclass(frozen=True)
class Cost:
    """Counts for one phase: FLOPs (torch's FlopCounterMode), bytes across PCIe each way (the
    copies made through runtime/transfer.py, plus offloaded weights), the part of those bytes
    that blocks the host (pageable or synchronous), kernel launches (non-view aten ops), host
    synchronisations and, under band parallelism, the bytes a rank puts on the wire to its
    peers (ring collectives: parallel/traffic.ring_bytes) and its messages."""

    flops: int = 0
    conv_flops: int = 0
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    blocking_bytes: int = 0
    launches: int = 0
    syncs: int = 0
    link_bytes: int = 0
    messages: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def times(self, k: float) -> Cost:
        """k copies of this phase (k UNet calls, k tiles of one window shape)."""
        return Cost(*(round(getattr(self, f.name) * k) for f in fields(self)))

    def to_dict(self) -> dict:
        return asdict(self)


ZERO = Cost()
PHASES = ("unet", "vae_encode", "vae_decode")


class Ledger(Protocol):
    """(phase, width px, height px, MemoryPlan, guidance) -> the phase's Cost, once."""

    def __call__(self, phase: str, width: int, height: int, plan, guidance: bool) -> Cost: ...


@dataclass(frozen=True)
class StageCost:
    """A stage's cost per phase (UNet: all its calls) and its predicted seconds on one GPU."""

    phases: dict  # phase -> Cost
    gpu: Gpu

    @property
    def total(self) -> Cost:
        return sum(self.phases.values(), ZERO)

    def seconds(self, phase: str | None = None) -> float:
        """Predicted seconds of a phase, or of the stage (its phases run one after another)."""
        names = [phase] if phase else list(self.phases)
        return sum(predict(self.phases[n], self.gpu).predicted_s for n in names)

    def to_dict(self) -> dict:
        """The dry run's `cost` object: counts, compute seconds and predicted seconds."""
        total, parts = self.total, {n: predict(c, self.gpu) for n, c in self.phases.items()}
        return {"flops": total.flops, "host_to_device_bytes": total.h2d_bytes,
                "device_to_host_bytes": total.d2h_bytes, "blocking_bytes": total.blocking_bytes,
                "launches": total.launches, "syncs": total.syncs,
                "peer_bytes": total.link_bytes, "peer_messages": total.messages,
                "compute_s": round(sum(p.compute_s for p in parts.values()), 3),
                "predicted_s": round(self.seconds(), 3),
                "phases": {n: {**c.to_dict(), "predicted_s": round(parts[n].predicted_s, 3)}
                           for n, c in self.phases.items()}}


def offload_cost(offload: str, weights: dict, calls: int) -> Cost:
    """Weights that accelerate's offload moves (not through transfer.py: counted from sizes):
    "model" brings each model to the device once per stage; "sequential" every UNet layer at
    every call. weights: {"unet": bytes, "vae": bytes, "text": bytes}. Pageable, blocking."""
    if offload == "model":
        n = weights["unet"] + weights["vae"] + weights["text"]
    elif offload == "sequential":
        n = weights["unet"] * calls + weights["vae"] + weights["text"]
    else:
        return ZERO
    return Cost(h2d_bytes=n, blocking_bytes=n)


def stage_cost(ledger: Ledger, gpu: Gpu, stage, plan, weights: dict) -> StageCost:
    """Every phase of one stage under its memory plan: UNet calls (CFG counted by the ledger's
    batch), the img2img encode, the decode, offloaded weights added to the UNet phase."""
    guidance = stage.guidance > 1
    calls = stage.denoise_steps * (2 if stage.method == "demofusion" else 1)
    unet = ledger("unet", stage.width, stage.height, plan, guidance).times(calls)
    phases = {"unet": unet + offload_cost(plan.offload, weights, calls)}
    if stage.strength is not None:
        phases["vae_encode"] = ledger("vae_encode", stage.width, stage.height, plan, guidance)
    phases["vae_decode"] = ledger("vae_decode", stage.width, stage.height, plan, guidance)
    return StageCost(phases, gpu)
