"""Everything the CLI draws goes to stderr: messages, and rich progress bars for pipeline events
(or, with --progress json, one JSON object per line for every event: progress_json.py)."""

from __future__ import annotations

import logging
import re
import sys
import warnings
import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from ..pipeline.events import (PhaseProgress, PreviewFailed, PreviewWritten, Retrying, StageFinished,
                               StageStarted)
from ..adapters.file_checks import reason
from ..errors import LinfusionError
from ..progress_json import JsonLogHandler, JsonProgress, JsonStderr

stderr = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)  # "x:abc:" is not an emoji


last_error: list[str] = []  # the last error line, for a launcher's error file (app.run)
# C0 controls but tab and newline, DEL and C1 controls: ESC starts the sequences that clear the
# screen or set the title, U+009B is an 8-bit CSI, CR lets a line overwrite the one it follows
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """Text that echoes user input (prompts, preset names and descriptions, paths) without the
    control characters a terminal would obey: a file name never clears the screen."""
    return _CONTROLS.sub("", text)


def error(message: str) -> None:
    """One short line on stderr (the message is never read as rich markup)."""
    from rich.markup import escape

    line = terminal_safe(" ".join(message.splitlines()))
    last_error[:] = [line]
    stderr.print(f"[bold red]error:[/] {escape(line)}", markup=True)


def one_line_of(exc: BaseException) -> str:
    """An exception as one line: our errors as they are, others with their kind in brackets
    (and never the advice to unpickle with weights_only=False)."""

    if isinstance(exc, LinfusionError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{reason(exc)} ({type(exc).__name__}; run with -v for details)"


def info(message: str, *, quiet: bool = False) -> None:
    if not quiet:
        stderr.print(terminal_safe(message), markup=False)


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
        elif isinstance(event, PreviewFailed) and not self.quiet:
            info(f"preview: {event.reason}; the run goes on without previews")
        elif isinstance(event, PreviewWritten) and self.verbose and self.progress is None \
                and event.step is None:
            info(f"stage {event.stage + 1}: preview {event.path} ({event.width}x{event.height})")

    # what the JSON view reports besides the pipeline's events; the bars say only the first
    def loading(self, model: str) -> None:
        info(f"loading {model} ...", quiet=self.quiet)

    def loaded(self) -> None:
        pass

    def run_started(self, plan, path, index: int | None = None) -> None:
        pass

    def run_finished(self, result: dict | None = None, *, index: int | None = None,
                     error: str | None = None) -> None:
        pass

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
    router = sys.stderr if isinstance(sys.stderr, JsonStderr) else None
    if not verbose or router is not None:  # --progress json: no bars, ever
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    if router is not None:  # their loggers write to a stream of their own: JSON lines instead
        for library in (diffusers.utils.logging, transformers.utils.logging):
            handler = JsonLogHandler()
            library.disable_default_handler()
            library.add_handler(handler)
            router.undo.append(lambda library=library, handler=handler: (
                library.remove_handler(handler), library.enable_default_handler()))


def progress_view(mode: str | None, *, quiet: bool = False, verbose: bool = False):
    """The progress handler --progress asks for: bars (default), JSON lines, or none (messages only)."""
    if mode == "json":
        return JsonProgress(quiet=quiet)
    view = ProgressView(quiet=quiet, verbose=verbose)
    if mode == "none":
        view.live = view.verbose = False
    return view
