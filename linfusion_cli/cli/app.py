"""The `linfusion` command: the only place library errors become messages and exit codes.

Exit codes: 0 success, 2 bad usage or input, 1 failure at run time, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM), 129 hung up (SIGHUP).
"""

from __future__ import annotations

import contextlib
from importlib import metadata
import json
import signal
import time
import traceback
import sys

import logging
import os

from typing import Annotated

import typer

try:  # typer >= 0.2x ships its own copy of click; its exceptions are the ones raised
    from typer._click import exceptions as click
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click

from .. import interrupts
from ..parallel import launch
from ..errors import LinfusionError
from . import _imported, batch, generate, info, presets_cmd, upscale
from .console import error
from ..progress_json import json_stderr
from .. import __version__
from .console import last_error, one_line_of

_EXITS = tuple(c for c in (getattr(click, "Exit", None), typer.Exit) if c is not None)
_ABORTS = tuple(c for c in (getattr(click, "Abort", None), getattr(typer, "Abort", None)) if c is not None)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Very large images (up to 16384 px) with Stable Diffusion + LinFusion.")


def version_text() -> str:
    """The installed package's version (the source tree's when run uninstalled)."""
    try:
        return metadata.version("linfusion-cli")
    except metadata.PackageNotFoundError:
        return __version__


def _print_version(value: bool) -> None:
    if value:
        print(f"linfusion {version_text()}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                                help="Print the version and exit.")] = False) -> None:
    """Very large images (up to 16384 px) with Stable Diffusion + LinFusion."""


app.command("generate")(generate.generate)
app.command("upscale")(upscale.upscale)
app.command("batch")(batch.batch)
app.command("info")(info.info)
app.add_typer(presets_cmd.app, name="presets")


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; every error is one line on stderr (with
    --progress json, every line on stderr is a JSON object, errors included)."""
    args = argv if argv is not None else sys.argv[1:]
    with json_stderr(_rank()) if _json_progress(args) else contextlib.nullcontext():
        try:
            with interrupts.installed():
                try:
                    code = _run(argv)
                except KeyboardInterrupt:
                    code = _interrupted()
        except KeyboardInterrupt:  # a signal in the last instant, as the handlers were put back
            code = _interrupted()
    if code:
        _tell_launcher()
    return code


def _json_progress(args: list[str]) -> bool:
    """--progress json is on the command line (read before Typer, so its usage errors are JSON too)."""
    args = [str(a) for a in args]
    return "--progress=json" in args or any(a == "--progress" and b == "json" for a, b in zip(args, args[1:]))


def _rank() -> int:
    """This process's rank under a launcher (only rank 0 reports progress)."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _tell_launcher() -> None:
    """Under torchrun, put the error line in the worker's error file: torchrun then shows it as
    the failure's root cause at the end of its report, instead of a pointer to its docs."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or not last_error:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": f"error: {last_error[0]}", "timestamp": int(time.time())}, f)
    except OSError:  # the launcher's folder is gone: its report stays generic
        pass


def _interrupted() -> int:
    """The one line and exit code for Ctrl-C (130), SIGTERM (143) or SIGHUP (129)."""
    signum = interrupts.received[0] if interrupts.received else signal.SIGINT
    line = "interrupted" if signum == signal.SIGINT else f"interrupted ({signal.Signals(signum).name})"
    if launch.speaks(_rank()):  # under torchrun every rank gets the signal: rank 0 says it
        error(line)
    else:
        last_error[:] = [line]
    return 128 + signum


def _run(argv: list[str] | None) -> int:
    bad = next((a for a in (argv or ()) if "\0" in a), None)
    if bad is not None:  # only possible in-process: the OS passes C strings
        error(f"argument {bad.split(chr(0))[0]!r}... contains a NUL byte")
        return 2
    verbose = any(a in ("-v", "--verbose") for a in (argv if argv is not None else sys.argv[1:]))
    # Library notices (e.g. "VAE attention ran in windows") are details: shown with -v only; the
    # run record keeps them either way.
    logging.basicConfig(format="%(message)s", level=logging.INFO if verbose else logging.ERROR)
    logging.getLogger().setLevel(logging.INFO if verbose else logging.ERROR)  # also when configured before
    logging.getLogger("linfusion_cli").setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:  # diffusers/transformers/hub bars and notices would crowd our stderr
        for name, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                            ("DIFFUSERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
            os.environ.setdefault(name, value)
    try:
        code = app(args=argv, prog_name="linfusion", standalone_mode=False)
        if code == 130:  # typer >= 0.2x turns Ctrl-C into Exit(130) and returns it here
            return _interrupted()
        return code if isinstance(code, int) else 0
    except _EXITS as exc:
        return exc.exit_code
    except click.ClickException as exc:  # usage errors: unknown option, missing argument
        message = exc.format_message()
        if message and not isinstance(exc, getattr(click, "NoArgsIsHelpError", ())):
            error(message.splitlines()[0])
        return 2 if isinstance(exc, click.UsageError) else exc.exit_code
    except (*_ABORTS, KeyboardInterrupt):
        return _interrupted()
    except LinfusionError as exc:
        line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if getattr(exc, "echo", True):  # False on ranks > 0 for an error every rank agreed on
            error(line)
        else:
            last_error[:] = [line]
        if verbose and exc.__cause__ is not None:
            error(f"caused by {type(exc.__cause__).__name__}: {exc.__cause__}")
        return exc.exit_code
    except BrokenPipeError:
        return 1
    except MemoryError:
        error("out of host memory (run with -v for details)")
        return 1
    except Exception as exc:  # an unexpected failure: still one line unless -v
        if verbose:
            traceback.print_exc()

        error(one_line_of(exc))
        return 1


def main() -> None:
    code = run()
    if _a_rank():  # every line is out; skip the interpreter's teardown, where torch.distributed's
        sys.stdout.flush()  # store threads were seen to abort a rank (SIGABRT, "terminate called
        sys.stderr.flush()  # without an active exception") after its last line, its exit code lost
        os._exit(code)
    sys.exit(code)


def _a_rank() -> bool:
    """A launcher started this process as one of several (its variables are all there)."""
    try:
        return launch.launcher_env()
    except LinfusionError:  # not integers: run() has said so already
        return False


_imported()
