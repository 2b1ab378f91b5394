"""The one door between host and device memory: every copy the package makes across PCIe goes
through `to_host` / `to_device`, so the cost ledger (tracing/ledger.py) sees every byte.

Copies are counted by observers pushed with `observed(...)` (a stack, like torch's dispatch
modes): the ledger and tests push one around a forward; nothing else reads it. On the meta device
(the ledger's full-size runs) a "host" copy is another meta tensor: meta stands for both sides,
the bytes are still counted.

Pinned host buffers (`host_buffer(pinned=True)`) make copies asynchronous on CUDA; the caller
must not reuse or free such a buffer before an event recorded after the copy has completed
(runtime/staging.py does that bookkeeping). On a machine without CUDA, pinning is skipped: the
same code runs, synchronously.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

HOST = torch.device("cpu")
# (direction "h2d" | "d2h", bytes, blocking): called for every copy across the door
Observer = Callable[[str, int, bool], None]
_observers: list[Observer] = []


@contextmanager
def observed(observer: Observer) -> Iterator[None]:
    """Call `observer` for every host<->device copy made inside the block."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


def _note(direction: str, t: torch.Tensor, blocking: bool) -> None:
    for observer in list(_observers):
        observer(direction, t.numel() * t.element_size(), blocking)


def is_host(t: torch.Tensor) -> bool:
    """Whether t lives in host memory (a meta tensor stands for either side)."""
    return t.device.type == "cpu"


def can_pin() -> bool:
    """Pinned (page-locked) host memory exists only with a CUDA runtime."""
    return torch.cuda.is_available()


def host_buffer(shape, dtype: torch.dtype, *, like: torch.Tensor | None = None,
                pinned: bool = True) -> torch.Tensor:
    """An empty host buffer (page-locked where CUDA is there and `pinned`); meta when `like` is."""
    if like is not None and like.is_meta:
        return torch.empty(shape, dtype=dtype, device="meta")
    return torch.empty(shape, dtype=dtype, device=HOST, pin_memory=pinned and can_pin())


def to_host(t: torch.Tensor, out: torch.Tensor | None = None,
            non_blocking: bool = False) -> torch.Tensor:
    """t's copy in host memory (written into `out` when given, e.g. a pinned buffer). Counted
    on every call: callers call it only to park, and a CPU run that forces parking (tests) is
    counted like a GPU one, though its "copy" of a host tensor is the tensor itself."""
    blocking = not (non_blocking and out is not None and (out.is_meta or out.is_pinned()))
    _note("d2h", t, blocking)
    if out is None:
        return torch.empty_like(t) if t.is_meta else t.to(HOST)
    if not (out.is_meta or t.is_meta):
        out.copy_(t, non_blocking=not blocking)
    return out


def to_device(t: torch.Tensor, device: torch.device | str, out: torch.Tensor | None = None,
              non_blocking: bool = False) -> torch.Tensor:
    """t (parked in host memory) back on `device` (into `out` when given), asynchronously only
    from pinned memory. Counted on every call, like to_host."""
    device = torch.device(device)
    pinned = t.is_meta or (t.device.type == "cpu" and t.is_pinned())
    _note("h2d", t, not (non_blocking and pinned))
    if t.is_meta or device.type == "meta":
        return torch.empty_like(t, device=device) if out is None else out
    if out is None:
        return t.to(device, non_blocking=non_blocking and pinned)
    return out.copy_(t, non_blocking=non_blocking and pinned)
