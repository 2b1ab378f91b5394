"""--progress json, the machine format scripts and dashboards read (docs/progress.md): one JSON
object per line on stderr for every event of a run (JsonProgress), every other line on stderr
made one too (JsonStderr, JsonLogHandler) while the mode is on (json_stderr)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import sys
import time

from .pipeline.events import (PhaseProgress, PreviewFailed, PreviewWritten, Retrying, StageFinished,
                              StageStarted)


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
