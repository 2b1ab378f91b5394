"""What applying a memory plan put in effect on a model, as a typed record: pipeline/knobs.py fills
it as each knob goes on, the read-back and the ControlNet residuals (adapters/residuals.py) are
handed it, so nothing rides on modules or functions to say what ran."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Bands:
    """The band-wise forward in effect on a model (linfusion_cli/bands)."""

    rows: int | None  # latent rows per band at full resolution; None: one band per level
    park_skips: bool  # skips (and a ControlNet's residuals) parked in host memory as made
    group: object = None  # parallel.BandGroup whose ranks compute it (None: alone)


class SkipFetch:
    """The calls each skip parked by hooks goes through as it comes back to the device,
    out = call(host skip, device copy): how ControlNet residuals join skips parked on the host."""

    def __init__(self) -> None:
        self._calls: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = []

    def register(self, call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        """Add `call`; returns its removal."""
        self._calls.append(call)
        return lambda: self._calls.remove(call)

    def __call__(self, host: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for call in self._calls:
            out = call(host, out)
        return out


@dataclass(frozen=True)
class KnobsInEffect:
    """The knobs on a model that are not module state, as the code that applied them made them
    (attention chunks, in-place SiLU and offload are read from the modules themselves)."""

    ff_chunk: int = 0  # tokens per feed-forward chunk (0: no FeedForward chunked)
    cfg_split: bool = False  # the forward runs a guidance batch as two halves
    bands: Bands | None = None  # the band-wise forward (None: the model's own forward)
    skip_fetch: SkipFetch | None = None  # skips parked by hooks (not bands): their fetch calls

    @property
    def skips_on_cpu(self) -> bool:
        """Skips wait in host memory: parked by hooks, or by the band-wise forward."""
        return self.skip_fetch is not None or (self.bands is not None and self.bands.park_skips)

    @property
    def band_rows(self) -> int:
        """Rows per band as the run record states them (0: no bands asked, even band-wise)."""
        return (self.bands.rows or 0) if self.bands is not None else 0
