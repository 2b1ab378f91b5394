"""Input files the user names: `~` expanded, anything but a regular file refused before opening.

Opening a FIFO or a device blocks (sometimes past SIGINT), so every input path (LoRA, IP-Adapter,
control image, preset, manifest, single-file model, config files, prompt files) is stat'ed first.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import InputError, ModelNotFoundError

MAX_CONFIG_BYTES = 4 << 20  # a diffusers/transformers config.json is a few KiB; YAML presets too

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def expand(value):
    """`~` and `~user` expanded in a path-like string, the same for every flag, preset and line."""
    if isinstance(value, str) and value.startswith("~"):
        return os.path.expanduser(value)
    if isinstance(value, Path) and str(value).startswith("~"):
        return value.expanduser()
    return value


def kind_of(path: str | os.PathLike) -> str | None:
    """None for a regular file (links followed), else what it is ('a FIFO', 'missing', ...)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def regular_file(path: str | os.PathLike, what: str, *, error=InputError) -> Path:
    """The path when it is a regular file; a missing one is ModelNotFoundError, anything else
    (FIFO, device, socket, folder) `error`, both one line and before any open()."""
    path = Path(expand(path))
    kind = kind_of(path)
    if kind == "missing":
        raise ModelNotFoundError(f"{what} {path} not found")
    if kind is not None:
        raise error(f"{what} {path} is {kind}, not a regular file")
    return path


def read_bounded(path: str | os.PathLike, what: str, *, limit: int = MAX_CONFIG_BYTES,
                 error=InputError) -> str:
    """A small text file (config, preset) read whole: regular, at most `limit` bytes, UTF-8."""
    path = regular_file(path, what, error=error)
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise error(f"{what} {path} is over {limit >> 20} MiB; that is no config file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text") from None


def home() -> Path:
    """The user's home folder: $HOME when it is an absolute path other than /, else the
    password database's; an empty HOME must not put caches and configs at the filesystem root."""
    value = os.environ.get("HOME", "")
    if os.path.isabs(value) and value.strip("/"):
        return Path(value)
    try:
        import pwd

        entry = pwd.getpwuid(os.getuid()).pw_dir
    except (ImportError, KeyError, OSError):
        entry = ""
    if os.path.isabs(entry) and entry.strip("/"):
        return Path(entry)
    raise InputError("HOME is empty or / and no home folder is known; set HOME, or LINFUSION_CACHE "
                     "and LINFUSION_CONFIG_DIR")
