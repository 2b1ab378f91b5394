"""What failed in a stage and where (out of memory, NaN/inf), agreed among band-parallel ranks.

A stage runs in phases (the UNet's forwards, the VAE's decode and encode). Each phase's entry is
where the test hook strikes and, under band parallelism, where the ranks agree: every rank
all-reduces a status code there (and once more at the stage's end), so a failure on one rank
sends every rank to the same retry with the same new plan, or every rank stops with one line.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from .. import testhooks

# status codes, all-reduced with MAX: the highest failure wins on every rank alike
REASONS = ("ok", "nan:vae", "nan:unet", "oom:vae_encode", "oom:vae_decode", "oom:unet")
OK = 0
_RANKS = 4096  # code = reason * _RANKS + rank (the rank that failed, for the record)

# RuntimeError texts that mean the device (or a library on it) could not allocate
_OOM_TEXTS = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "cudaErrorMemoryAllocation",
              "CUDA error: out of memory", "can't allocate memory", "HIP out of memory")
_OOM_LIBS = ("CUDA", "cuDNN", "CUDNN", "cuBLAS", "CUBLAS", "cuFFT", "MPS", "XPU")


def is_oom(exc: BaseException) -> bool:
    """Out of memory in any of the forms torch and its libraries raise it (NCCL's end in the
    group's own error: parallel.GroupError)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return any(t in text for t in _OOM_TEXTS) or (
        "out of memory" in text.lower() and any(lib in text for lib in _OOM_LIBS))


def code_of(reason: str, rank: int = 0) -> int:
    return REASONS.index(reason) * _RANKS + rank


@dataclass(frozen=True)
class Failure:
    """One failed attempt, as every rank agreed on it."""

    kind: str  # "oom" or "nan"
    where: str  # a phase (unet, vae_decode, vae_encode) or a part (unet, vae)
    rank: int | None  # the rank that failed first under band parallelism

    @classmethod
    def of(cls, code: int, group) -> Failure:
        kind, where = REASONS[code // _RANKS].split(":")
        return cls(kind, where, code % _RANKS if group is not None else None)

    def reason(self) -> str:
        what = f"out of memory in the {self.where}" if self.kind == "oom" else \
            f"NaN/inf from the {self.where.upper()}"
        return what + (f" on rank {self.rank}" if self.rank is not None else "")


class Agreed(Exception):
    """Raised on every rank at a phase entry once the ranks agreed that one of them failed."""

    def __init__(self, code: int):
        super().__init__(f"a rank failed: {REASONS[code // _RANKS]}")
        self.code = code


class Phases:
    """The phase a stage is in (an out-of-memory is charged to it), the test hook's faults
    (testhooks.OomFaults, handed down by the caller) and the band-parallel group, if any."""

    def __init__(self, faults: testhooks.OomFaults | None = None, group=None):
        self.faults, self.group, self.current = faults, group, "unet"

    def enter(self, phase: str) -> None:
        """At a phase's entry: strike the test hook's fault; under a group, agree first."""
        self.current = phase
        struck = self.faults is not None and self.faults.strike(phase)
        if self.group is not None:
            code = self.agree(code_of(f"oom:{phase}", self.group.rank) if struck else OK)
            if code != OK:
                raise Agreed(code)
        elif struck:
            raise torch.OutOfMemoryError(f"out of memory at the {phase} ({testhooks.OOM})")

    def agree(self, code: int) -> int:
        """The ranks' highest status code (this rank's alone without a group)."""
        return code if self.group is None else self.group.agree(code)

    def unet_hook(self, unet: torch.nn.Module):
        """A forward pre-hook: each UNet forward is an entry of the unet phase; remove() it."""
        return unet.register_forward_pre_hook(lambda module, args: self.enter("unet"))


def release(device: torch.device) -> None:
    """Free what a failed attempt left: cycles first, then the allocator's cached blocks. The
    caller has already let go of the exception (its traceback holds the stage's activations)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
