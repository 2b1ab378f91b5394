"""Progress events the pipeline reports; only the CLI turns them into bars."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class StageStarted:
    stage: int
    stages: int
    width: int
    height: int
    steps: int  # denoising steps this stage runs


@dataclass(frozen=True)
class PhaseProgress:
    """A unit of work inside a stage: a denoising step, or a VAE tile."""

    stage: int
    phase: str  # "encode" | "denoise" | "decode"
    done: int
    total: int


@dataclass(frozen=True)
class StageFinished:
    stage: int
    stages: int
    seconds: float
    peak_gib: float | None
    image: object  # numpy uint8 (H, W, 3): kept by the caller when stages are saved
    record: dict
    path: str | None = None  # where the caller kept the stage's image (--save-stages), if it did


@dataclass(frozen=True)
class Retrying:
    """A stage failed (out of memory: retried with a plan tighter for the phase; NaN/inf: in bf16
    or float32) and runs again."""

    stage: int
    reason: str


@dataclass(frozen=True)
class PreviewWritten:
    """--preview rewrote its file: after a denoising step, or (step None) from the stage's image."""

    stage: int
    step: int | None  # denoising steps done when it was drawn; None: the finished stage's image
    steps: int  # the stage's denoising steps
    path: str
    width: int
    height: int
    method: str  # latent2rgb | taesd | image
    seconds: float  # what it took: pooling, drawing and the atomic write


@dataclass(frozen=True)
class PreviewFailed:
    """The preview could not be written (a full disk ...): the run goes on without previews."""

    stage: int
    reason: str


Event = StageStarted | PhaseProgress | StageFinished | Retrying | PreviewWritten | PreviewFailed
EventHandler = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The default handler: no progress reporting."""
