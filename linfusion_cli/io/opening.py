"""Opening user and own images lazily, with one-line errors and 16K sizes allowed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from ..errors import InputError, ModelNotFoundError
from ..inputs import expand, kind_of

# Pillow refuses > 2 * MAX_IMAGE_PIXELS; our largest images are 16384 x 16384.
MAX_PIXELS = int(16384 * 16384 * 1.1)


@contextlib.contextmanager
def large_images_allowed() -> Iterator[None]:
    """Raise Pillow's decompression-bomb limit so 16K images open (it errs above 2x the limit)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(saved or 0, MAX_PIXELS) if saved is not None else None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def open_lazily(path: Path) -> Image.Image:
    """Open an image lazily with one-line errors that name the path."""
    path = Path(expand(path))
    kind = kind_of(path)
    if kind == "missing":
        raise ModelNotFoundError(f"image not found: {path}")
    if kind is not None:  # a FIFO or device would block the open
        raise InputError(f"{path} is {kind}, not an image file")
    with large_images_allowed():
        try:
            return Image.open(path)
        except Image.DecompressionBombError:
            raise InputError(f"{path} is too large (over {MAX_PIXELS * 2} pixels)") from None
        except Image.UnidentifiedImageError:
            raise InputError(f"{path} is not an image Pillow can read") from None
        except (OSError, ValueError, SyntaxError) as exc:  # ValueError: a PNG text bomb
            raise InputError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
