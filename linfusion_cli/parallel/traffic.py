"""What one rank sends per UNet step, counted without a process group (on the meta device too),
so the figures at 16384 px come from the code that runs, not from a hand count."""

from __future__ import annotations

import torch

from ..bands.unet_forward import banded_forward
from .comm import BandGroup


class CountingGroup(BandGroup):
    """Rank `rank` of `size` with every message counted and none sent: received rows, sums and
    the gathered output are zeros (the maths is wrong, the sizes are exact). `messages`: the
    collectives and halo exchanges this rank waited on."""

    messages = 0

    def all_reduce(self, flat: torch.Tensor, kind: str) -> torch.Tensor:
        self.sent[kind] += flat.numel() * flat.element_size()
        self.messages += 1
        return flat

    def exchange(self, sends: dict, recvs: dict) -> None:
        self.messages += bool(sends or recvs)
        copies = [t.contiguous() for t in sends.values()]  # what BandGroup.exchange hands over
        for t in copies:
            self.sent["halo"] += t.numel() * t.element_size()
        del copies
        for t in recvs.values():
            t.zero_()

    def gather_rows(self, local: torch.Tensor, parts, kind: str) -> torch.Tensor:
        most = max(b - a for a, b in parts)
        self.messages += 1
        self.sent[kind] += most * local[:1].numel() * local.element_size()
        return local.new_zeros(self.size * most, *local.shape[1:])[:parts[-1][1]]


def ring_bytes(sent: dict, size: int) -> dict:
    """Payloads as bytes a rank puts on the wire with ring collectives (NCCL's): an all-reduce
    sends 2 (N - 1) / N of its buffer, an all-gather N - 1 copies of the rank's piece; point to
    point halos are sent once."""
    ring = 2 * (size - 1) / size
    return {kind: int(n * (size - 1 if kind == "gather" else 1 if kind == "halo" else ring))
            for kind, n in sent.items()}


def step_traffic(unet, sample: torch.Tensor, timestep, context: torch.Tensor, *, size: int,
                 rank: int, band_rows: int | None = None, **kwargs) -> dict:
    """Payload bytes rank `rank` of `size` sends during one UNet forward of `sample` (B, 4, H, W),
    by kind (halo, moments, key_state, gather); band_rows as bands.unet_forward.banded_forward takes it
    (None: one band per level, as a plan without band_rows runs)."""
    group = CountingGroup(rank, size, sample.device)
    with torch.no_grad():
        banded_forward(unet, band_rows, False, sample, timestep, context, group=group, **kwargs)
    return dict(group.sent)
