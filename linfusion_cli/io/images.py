"""Image files: atomic writes with metadata, and reading a user's images at 16K sizes."""

from __future__ import annotations

from PIL import ImageOps
import glob
import numpy as np
import socket
import contextlib
import errno
import io
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from .. import interrupts
from ..errors import InputError, OutputError, WriteError
from .metadata import save_kwargs
from .naming import format_of
from .opening import large_images_allowed, open_lazily
from ..inputs import expand

PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "tiff": "TIFF"}


# ---------------------------------------------------------------- writing


def _as_image(image: Any) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(image)


def save_image(
    image: Any,
    path: Path | None,
    *,
    record: dict[str, Any],
    fmt: str | None = None,
    overwrite: bool = False,
    png_compress_level: int = 1,
    stream: BinaryIO | None = None,
) -> Path | None:
    """Encode with metadata, atomically: a half-written 16K file must never look finished."""
    fmt_name = format_of(path, fmt)
    pil = _as_image(image)
    kwargs = save_kwargs(fmt_name, record, png_compress_level)
    if path is None:
        out = stream if stream is not None else sys.stdout.buffer
        try:
            if fmt_name == "tiff":  # the TIFF writer seeks; pipes cannot
                buffer = io.BytesIO()
                pil.save(buffer, format="TIFF", **kwargs)
                out.write(buffer.getbuffer())
            else:
                pil.save(out, format=PIL_FORMATS[fmt_name], **kwargs)
            out.flush()
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as exc:  # a full disk behind the pipe, a closed stdout
            raise WriteError(f"cannot write the image to stdout: {_why(exc)}") from None
        return None
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass --overwrite")
    clean_stale_parts(path)
    tmp = path.with_name(f".{path.name}.{_owner()}.{secrets.token_hex(4)}.part")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {_why(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as fh, _quiet_c_stderr(fmt_name == "tiff"):
            pil.save(fh, format=PIL_FORMATS[fmt_name], **kwargs)
            fh.flush()
            os.fsync(fh.fileno())
        with interrupts.critical():
            _publish(tmp, path, overwrite)
    except BaseException as exc:
        with interrupts.critical(), contextlib.suppress(OSError):
            tmp.unlink()
        tiff_failed = isinstance(exc, RuntimeError) and fmt_name == "tiff"  # libtiff's way to say ENOSPC
        if (isinstance(exc, OSError) and not isinstance(exc, FileExistsError)) or tiff_failed:
            raise WriteError(f"cannot write {path}: {_why(exc)}") from None
        raise
    return path


def _owner() -> str:
    """host-pid of this process, in its temporary files' names (stale ones are found by it)."""
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def clean_stale_parts(path: Path) -> None:
    """Remove `.NAME.HOST-PID.*.part` files of `path` that a killed process (SIGKILL, power loss)
    left: only this host's, only of processes that are gone."""
    host = socket.gethostname().replace(".", "_")
    try:
        candidates = list(path.parent.glob(f".{glob_escape(path.name)}.{glob_escape(host)}-*.part"))
    except OSError:
        return
    for part in candidates:
        pid = part.name[len(path.name) + len(host) + 3:].split(".", 1)[0]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            part.unlink()


def glob_escape(text: str) -> str:
    return glob.escape(text)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host holds `pid` (a stale .part or lock names a dead one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process: alive
    return True


def _why(exc: BaseException) -> str:
    """One line for a failed write; the TIFF encoder says little, so name the likely cause."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() if exc.errno == errno.ENOSPC else exc.strerror
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{text} (is the disk full?)" if isinstance(exc, RuntimeError) else text


@contextlib.contextmanager
def _quiet_c_stderr(active: bool) -> Iterator[None]:
    """libtiff prints its own errors on fd 2; ours is the one line that counts."""
    if not active:
        yield
        return
    try:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished temp file into place, never clobbering a file without overwrite."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic no-clobber
    except FileExistsError:
        raise OutputError(f"{path} exists; pass --overwrite") from None
    except OSError:  # filesystem without hard links
        if path.exists():
            raise OutputError(f"{path} exists; pass --overwrite") from None
        os.replace(tmp, path)
        return
    tmp.unlink()




# ---------------------------------------------------------------- reading


def open_image(path: str | os.PathLike) -> Image.Image:
    """Load a user's input image as RGB, allowing 16K sizes that Pillow refuses by default."""
    path = Path(expand(path))
    im = open_lazily(path)
    try:
        with large_images_allowed():
            im.load()  # reads and closes the file; no copy for RGB inputs
            return to_rgb8(im)
    except (OSError, SyntaxError, ValueError) as exc:
        im.close()
        raise InputError(f"cannot read {path}: {exc}") from None


def to_rgb8(im: Image.Image) -> Image.Image:
    """Any mode Pillow opens as 8-bit RGB, upright: 16-bit and float values scaled (not clipped),
    alpha flattened on white, palettes and CMYK converted, the EXIF orientation applied."""
    im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode == "F":  # 16/32-bit integers or floats, one channel
        values = np.asarray(im, dtype=np.float64)
        if mode == "F":
            finite = values[np.isfinite(values)]
            top = 1.0 if finite.size == 0 or finite.max() <= 1.0 else 255.0
        elif mode.startswith("I;16") or values.max() <= 65535:
            top = 65535.0
        else:
            top = float(2 ** 32 - 1)
        grey = np.nan_to_num(values / top * 255.0, nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("P", "PA") or "A" in mode or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")

