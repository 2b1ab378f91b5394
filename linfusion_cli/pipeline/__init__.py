"""Progressive generation: plan -> stages -> image, reporting progress through events."""

from .events import PhaseProgress, PreviewFailed, PreviewWritten, Retrying, StageFinished, StageStarted
from .orchestrator import run_plan, run_record

__all__ = ["PhaseProgress", "PreviewFailed", "PreviewWritten", "Retrying", "StageFinished", "StageStarted",
           "run_plan", "run_record"]
