"""Everything the CLI draws goes to stderr: messages, and rich progress bars for pipeline events."""

from __future__ import annotations

import logging
import warnings
import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from ..pipeline.events import PhaseProgress, Retrying, StageFinished, StageStarted
from ..adapters.common import reason
from ..errors import LinfusionError

stderr = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)  # "x:abc:" is not an emoji


last_error: list[str] = []  # the last error line, for a launcher's error file (app.run)


def error(message: str) -> None:
    """One short line on stderr (the message is never read as rich markup)."""
    from rich.markup import escape

    last_error[:] = [" ".join(message.splitlines())]
    stderr.print(f"[bold red]error:[/] {escape(' '.join(message.splitlines()))}", markup=True)


def one_line_of(exc: BaseException) -> str:
    """An exception as one line: our errors as they are, others with their kind in brackets
    (and never the advice to unpickle with weights_only=False)."""

    if isinstance(exc, LinfusionError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{reason(exc)} ({type(exc).__name__}; run with -v for details)"


def info(message: str, *, quiet: bool = False) -> None:
    if not quiet:
        stderr.print(message, markup=False)


class ProgressView:
    """Draws stage k of n, the step or tile within it, elapsed time and ETA.

    Bars appear only on a terminal; with -v on a pipe it logs one line per stage instead.
    """

    def __init__(self, *, quiet: bool = False, verbose: bool = False):
        self.quiet = quiet
        self.verbose = verbose
        self.live = not quiet and stderr.is_terminal
        self.progress = None
        self.stage_task = self.step_task = None
        self.started = time.perf_counter()

    def __enter__(self):
        if self.live:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=stderr,
                                     transient=True)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False

    def __call__(self, event) -> None:
        if isinstance(event, StageStarted):
            self._stage_started(event)
        elif isinstance(event, PhaseProgress) and self.progress is not None:
            if self.step_task is not None:
                self.progress.update(self.step_task, description=f"  {event.phase}",
                                     completed=event.done, total=event.total)
        elif isinstance(event, StageFinished):
            if self.progress is not None:
                self.progress.update(self.stage_task, advance=1)
            elif self.verbose:
                peak = f", peak {event.peak_gib:.2f} GiB" if event.peak_gib is not None else ""
                info(f"stage {event.stage + 1}/{event.stages} done in {event.seconds:.1f} s{peak}")
        elif isinstance(event, Retrying) and not self.quiet:
            info(f"stage {event.stage + 1}: {event.reason}")

    def _stage_started(self, event: StageStarted) -> None:
        text = f"stage {event.stage + 1}/{event.stages} {event.width}x{event.height}"
        if self.progress is None:
            if self.verbose:
                info(f"{text}: {event.steps} denoising steps")
            return
        if self.stage_task is None:
            self.stage_task = self.progress.add_task("stages", total=event.stages)
            self.step_task = self.progress.add_task("  denoise", total=event.steps)
        self.progress.update(self.stage_task, description=text)
        self.progress.reset(self.step_task, total=event.steps, description="  denoise")


def quiet_libraries(verbose: bool = False) -> None:
    """diffusers/transformers draw their own bars and warnings on stderr; only -v keeps them.

    Process-wide (logging levels, warning filters): the CLI calls it, the library never does.
    """
    import diffusers
    import transformers

    level = "warning" if verbose else "error"
    for name in ("peft", "accelerate", "huggingface_hub", "safetensors"):  # peft logs LoRA misfits at length
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore", module="peft")
        warnings.filterwarnings("ignore", module=r"diffusers\..*")
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*torchvision.*")
    getattr(diffusers.utils.logging, f"set_verbosity_{level}")()
    getattr(transformers.utils.logging, f"set_verbosity_{level}")()
    if not verbose:
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
