"""The `linfusion` command. Importing typer, rich and torch takes seconds: a Ctrl-C, SIGTERM or
SIGHUP meanwhile ends the process with the same one line as during a run, not a traceback."""

import os as _os
import signal as _signal
import threading as _threading


def _interrupted_while_importing(signum, frame):  # pragma: no cover - exercised in a subprocess
    name = "" if signum == _signal.SIGINT else f" ({_signal.Signals(signum).name})"
    _os.write(2, f"error: interrupted{name}\n".encode())
    _os._exit(128 + signum)


_IMPORT_SIGNALS = {}
if _threading.current_thread() is _threading.main_thread():
    for _name in ("SIGINT", "SIGTERM", "SIGHUP"):
        _sig = getattr(_signal, _name, None)
        if _sig is not None:
            _IMPORT_SIGNALS[_sig] = _signal.getsignal(_sig)
            _signal.signal(_sig, _interrupted_while_importing)


def _imported() -> None:
    """The CLI's modules are loaded: the handlers from before come back (run() installs its own)."""
    for sig, handler in _IMPORT_SIGNALS.items():
        if _signal.getsignal(sig) is _interrupted_while_importing:
            _signal.signal(sig, handler if handler is not None else _signal.SIG_DFL)
    _IMPORT_SIGNALS.clear()
