"""Everything the CLI draws goes to stderr: messages, and rich progress bars for pipeline events
(or, with --progress json, one JSON object per line for every event: docs/progress.md)."""

from __future__ import annotations

import contextlib
import io
import json
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
from ..adapters.common import reason
from ..errors import LinfusionError

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


# ---------------------------------------------------------------- --progress json (docs/progress.md)

def event(name: str, **fields) -> None:
    """One JSON event on stderr: {"event": name, "time": unix seconds, **fields}, one line, flushed."""
    line = json.dumps({"event": name, "time": round(time.time(), 3), **fields})
    with contextlib.suppress(OSError, ValueError):  # a dashboard that went away stops no render
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _r(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


class JsonProgress:
    """--progress json: one JSON object per line on stderr for every event of a run."""

    def __init__(self, *, quiet: bool = False):
        self.quiet = quiet
        self.started = self.loading_since = self.last = time.perf_counter()
        self.stage_started: dict[int, float] = {}
        self.stages = 0
        self.phase: tuple[int, str] | None = None
        self.phase_started = self.started

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def emit(self, name: str, **fields) -> None:
        if not self.quiet:
            event(name, **fields)

    def loading(self, model: str) -> None:
        self.loading_since = time.perf_counter()
        self.emit("load_start", model=model)

    def loaded(self) -> None:
        self.emit("load_end", seconds=_r(time.perf_counter() - self.loading_since))

    def run_started(self, plan, path, index: int | None = None) -> None:
        self.started = self.last = time.perf_counter()
        self.stages = len(plan.stages)
        self.emit("run_start", **({"index": index} if index is not None else {}),
                  path=str(path) if path is not None else "-", prompt=plan.prompt, seed=plan.seed,
                  model=plan.model, family=plan.family, width=plan.width, height=plan.height,
                  device=plan.device, dtype=plan.dtype, predicted_s=plan.predicted_s,
                  stages=[{"stage": s.index + 1, "width": s.width, "height": s.height,
                           "strength": s.strength, "steps": s.denoise_steps, "method": s.method,
                           "estimated_peak_gib": s.memory.estimated_peak_gib if s.memory else None,
                           "predicted_s": (s.cost or {}).get("predicted_s")} for s in plan.stages],
                  preview=plan.preview.to_dict() if plan.preview is not None else None)

    def run_finished(self, result: dict | None = None, *, index: int | None = None,
                     error: str | None = None) -> None:
        fields = {"index": index} if index is not None else {}
        self.emit("run_end", **fields, ok=error is None, seconds=_r(time.perf_counter() - self.started),
                  path=result["path"] if result else None, error=error)

    def __call__(self, ev) -> None:
        now = time.perf_counter()
        if isinstance(ev, StageStarted):
            self.stage_started[ev.stage], self.stages, self.phase = now, ev.stages, None
            self.emit("stage_start", stage=ev.stage + 1, stages=ev.stages, width=ev.width,
                      height=ev.height, steps=ev.steps)
        elif isinstance(ev, PhaseProgress):
            if self.phase != (ev.stage, ev.phase):  # a phase starts where the last event left off
                self.phase, self.phase_started = (ev.stage, ev.phase), self.last
            spent = now - self.phase_started
            common = dict(stage=ev.stage + 1, stages=self.stages,
                          elapsed_s=_r(now - self.stage_started.get(ev.stage, self.started)),
                          eta_s=_r(spent / ev.done * (ev.total - ev.done)) if ev.done else None,
                          run_elapsed_s=_r(now - self.started))
            if ev.phase == "denoise":
                self.emit("step", **common, step=ev.done, steps=ev.total)
            else:
                self.emit("tile", **common, phase=ev.phase, tile=ev.done, tiles=ev.total)
        elif isinstance(ev, PreviewWritten):
            self.emit("preview", stage=ev.stage + 1, step=ev.step, steps=ev.steps, path=ev.path,
                      width=ev.width, height=ev.height, method=ev.method, seconds=_r(ev.seconds))
        elif isinstance(ev, PreviewFailed):
            self.emit("preview_error", stage=ev.stage + 1, message=ev.reason)
        elif isinstance(ev, Retrying):
            self.emit("retry", stage=ev.stage + 1, reason=ev.reason)
        elif isinstance(ev, StageFinished):
            self.emit("stage_end", stage=ev.stage + 1, stages=ev.stages, seconds=_r(ev.seconds),
                      peak_gib=ev.peak_gib, path=ev.path)
        self.last = time.perf_counter()


class JsonStderr(io.TextIOBase):
    """sys.stderr while --progress json runs: JSON event lines pass as they are; any other line (a
    message, an error, a library's notice, a stray print) becomes one {"event": "log"|"error"}
    object, so every line on stderr parses. Under a launcher, ranks > 0 keep only errors."""

    def __init__(self, target, rank: int = 0):
        self.target, self.rank = target, rank
        self.pending = ""
        self.undo: list = []  # what quiet_libraries changed, undone when the mode ends

    def writable(self) -> bool:
        return True

    @property
    def encoding(self):
        return getattr(self.target, "encoding", "utf-8")

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.target.fileno()

    def write(self, text: str) -> int:
        *lines, self.pending = re.split(r"[\r\n]", self.pending + text)
        for line in lines:
            self._line(line)
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.target.flush()

    def finish(self) -> None:
        if self.pending:
            self._line(self.pending)
            self.pending = ""

    def _line(self, line: str) -> None:
        if not line.strip():
            return
        if line.startswith('{"event"'):
            if self.rank:
                return
            out = line
        elif line.startswith("error: "):
            out = json.dumps({"event": "error", "time": round(time.time(), 3), "message": line[7:],
                              **({"rank": self.rank} if self.rank else {})})
        elif self.rank:
            return
        else:
            out = json.dumps({"event": "log", "time": round(time.time(), 3), "level": "info",
                              "message": line.strip()})
        with contextlib.suppress(OSError, ValueError):
            self.target.write(out + "\n")
            self.target.flush()


class JsonLogHandler(logging.Handler):
    """Log records (and, captured, Python warnings) as {"event": "log"} lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:  # noqa: BLE001 -- a record that cannot format is not worth a crash
            message = str(record.msg)
        event("log", level=record.levelname.lower(), logger=record.name, message=" ".join(message.split()))


@contextlib.contextmanager
def json_stderr(rank: int = 0):
    """--progress json for the whole command: sys.stderr routed (JsonStderr), the root logger's
    records and Python's warnings as JSON log events; everything put back at the end."""
    router = JsonStderr(sys.stderr, rank)
    root = logging.getLogger()
    saved_stderr, saved_handlers = sys.stderr, root.handlers[:]
    sys.stderr, root.handlers = router, [JsonLogHandler()]
    logging.captureWarnings(True)
    try:
        yield router
    finally:
        logging.captureWarnings(False)
        for undo in reversed(router.undo):
            undo()
        root.handlers = saved_handlers
        router.finish()
        sys.stderr = saved_stderr
