"""Where images may be written: inside the output folder, never through a link, a FIFO or a device.

Checked when the plan is made, so a collision is found before any model loads.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from ..errors import InputError, OutputError, WriteError
from ..validate import file_name

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def check_target(path: Path, *, overwrite: bool) -> None:
    """A path we may create (or, with overwrite, replace): links and special files are refused."""
    if "\n" in str(path) or "\r" in str(path):  # stdout carries one line per image
        raise OutputError(f"output {str(path)[:60]!r} contains a line break; pick a name without one")
    for part in path.parts[-1:]:
        file_name(part, f"output {path}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(f"cannot use {path}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode):
        state = "a dangling symbolic link" if not path.exists() else "a symbolic link"
        raise OutputError(f"{path} is {state}; refusing to write through it (remove it or pick another name)")
    for test, kind in _KINDS:
        if test(st.st_mode):
            raise OutputError(f"{path} is {kind}; refusing to write an image there")
    if not overwrite:
        raise OutputError(f"{path} exists; pass --overwrite")


def check_directory(directory: Path, *, create: bool) -> None:
    """A folder we can write into: made now (create) or, for a dry run, makeable later."""
    if create:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output directory {directory}: {exc.strerror}") from None
        existing = directory
    else:
        existing = directory
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise OutputError(f"cannot create output directory {directory}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to output directory {existing}")


def inside(folder: str, output: str) -> Path:
    """A batch entry's `output` as a file path inside `folder` (links resolved); else InputError."""
    if "\0" in output:
        raise InputError("output contains a NUL byte")
    if not output.strip() or output.endswith(("/", os.sep)) or Path(output).name in ("", ".", ".."):
        raise InputError(f"output {output!r} must name a file inside -o, not a folder")
    if os.path.isabs(output):
        raise InputError(f"output {output!r} is absolute; it must be a path inside -o")
    for part in Path(output).parts:
        file_name(part, f"output {output[:40]!r}")
    root = os.path.realpath(folder)
    resolved = os.path.realpath(os.path.join(root, output))  # symlinks on the way followed
    if resolved == root or os.path.commonpath([root, resolved]) != root:
        raise InputError(f"output {output!r} leaves the output folder {folder}")
    if os.path.isdir(resolved):
        raise InputError(f"output {output!r} is a folder; name a file inside it")
    return Path(folder) / os.path.relpath(resolved, root)  # shown as the user wrote -o


def image_bound(width: int, height: int, fmt: str) -> int:
    """Bytes an encoded image can take at most: raw RGB (+1 % and headers); JPEG at most half that."""
    raw = width * height * 3
    return (raw // 2 if fmt == "jpg" else raw + raw // 100) + (1 << 20)


def run_bound(plan, fmt: str) -> int:
    """Bytes one run may write: its final image and every earlier stage's checkpoint (PNG; kept
    until the final image is written, and after it with --save-stages)."""
    need = image_bound(plan.width, plan.height, fmt)
    return need + sum(image_bound(s.width, s.height, "png") for s in plan.stages[:-1])


def check_free_space(plan, path: Path | None, fmt: str, *, need: int | None = None,
                     what: str | None = None) -> None:
    """Refuse early when the output filesystem cannot hold what the run (or batch) will write."""
    if path is None:
        return
    if need is None:
        need = run_bound(plan, fmt)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # no figure to check against; the write itself reports a full disk
    if free < need:
        what = what or f"{plan.width}x{plan.height} {fmt}{' and its stage checkpoints' if len(plan.stages) > 1 else ''}"
        have, want = two_sizes(free, need)
        raise WriteError(f"{folder} has {have} free; this run may write up to {want} ({what})")


def two_sizes(a: int, b: int) -> tuple[str, str]:
    """Two byte counts in MiB with as many decimals as it takes for them to read differently."""
    for decimals in range(0, 7):
        x, y = f"{a / 2**20:.{decimals}f} MiB", f"{b / 2**20:.{decimals}f} MiB"
        if x != y or a == b:
            return x, y
    return f"{a} bytes", f"{b} bytes"


def make_directory(directory: Path) -> list[Path]:
    """check_directory(create=True), returning the folders it made (outermost first), so a run
    that fails before writing anything can take them away again (remove_if_empty)."""
    made, probe = [], Path(directory)
    while not probe.exists() and probe != probe.parent:
        made.append(probe)
        probe = probe.parent
    check_directory(Path(directory), create=True)
    return made[::-1]


def remove_if_empty(made: list[Path], *files: Path) -> None:
    """Undo make_directory after a failure: our empty files, then the folders if nothing is in them."""
    for file in files:
        try:
            if file.is_file() and not file.is_symlink() and file.stat().st_size == 0:
                file.unlink()
        except OSError:
            pass
    for folder in reversed(made):
        try:
            folder.rmdir()  # only if empty
        except OSError:
            continue
