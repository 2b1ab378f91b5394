"""Where parked skips live: host memory, through the one copy door (runtime/transfer.py).
The memory trace swaps these three to count parked skips as host memory."""

from __future__ import annotations

import torch

from . import transfer


def park(t: torch.Tensor) -> torch.Tensor:
    """Where skips_on_cpu keeps a skip (the memory trace replaces this to count it as host)."""
    return transfer.to_host(t)


def fetch(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A parked skip back on the device (the memory trace replaces this to count the copy)."""
    return transfer.to_device(t, device)


def host_buffer(shape, dtype: torch.dtype, *, like: torch.Tensor | None = None,
                pinned: bool = True) -> torch.Tensor:
    """Host memory that staged parking (runtime/staging.py) copies into (the memory trace
    replaces this: on the meta device, a buffer that stands for host memory)."""
    return transfer.host_buffer(shape, dtype, like=like, pinned=pinned)
