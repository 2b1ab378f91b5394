"""Where parked skips live: host memory (the memory trace swaps these two to count them)."""

from __future__ import annotations

import torch


def park(t: torch.Tensor) -> torch.Tensor:
    """Where skips_on_cpu keeps a skip (the memory trace replaces this to count it as host)."""
    return t.to("cpu")


def fetch(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A parked skip back on the device (the memory trace replaces this to count the copy)."""
    return t.to(device)
