"""One run per output file: a lock file beside it, so two runs (two --resume at once) never both
redo the remaining stages of one image.

The lock `.NAME.lock` is created with O_CREAT|O_EXCL (atomic, NFS included since v3) and holds
"pid host": the run that made it removes it at the end. A lock whose pid is dead on this host is
stale (a SIGKILL, a power loss) and is taken over; one from another host is reported with its
host, for the user to judge. Batches claim entries in their manifest instead (io/manifest.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path

from ..errors import OutputError
from ..inputs import kind_of
from .images import pid_alive


def lock_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.lock")


def _holder(path: Path) -> tuple[int, str] | None:
    """(pid, host) written in a lock file; None when unreadable or not a lock (a link, a FIFO:
    never followed or waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        pid, host = os.read(fd, 512).decode("utf-8").split(maxsplit=1)
        return int(pid), host.strip()
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_lock(final: Path | None):
    """Hold `final`'s lock for the block; OutputError at once when another live run holds it."""
    if final is None:
        yield None
        return
    path = lock_path(final)
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for attempt in (1, 2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            break
        except FileExistsError:
            holder = _holder(path)
            if attempt == 1 and holder is not None and holder[1] == socket.gethostname() \
                    and not pid_alive(holder[0]):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # stale: its run died without removing it
                continue
            if os.path.islink(path) or kind_of(path) not in (None, "missing"):
                what = "a symbolic link" if os.path.islink(path) else kind_of(path)
                raise OutputError(f"{path}, where {final.name}'s run lock goes, is {what}, not a "
                                  "lock; remove it") from None
            who = (f"process {holder[0]} on {holder[1]}" if holder is not None
                   else "another run (its lock file is unreadable)")
            raise OutputError(f"{final} is being made by {who} (lock {path}); wait for it, or "
                              "remove the lock if that run is gone") from None
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EROFS, errno.ENOENT):
                raise OutputError(f"cannot lock {final}: {exc.strerror} ({path})") from None
            raise
    try:
        os.write(fd, me.encode())
    finally:
        os.close(fd)
    try:
        yield path
    finally:
        if _holder(path) == (os.getpid(), socket.gethostname()):
            with contextlib.suppress(OSError):
                os.unlink(path)
