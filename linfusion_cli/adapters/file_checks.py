"""Shared checks for adapter files: local or hub id, readable, and the model family they fit."""

from __future__ import annotations

import contextlib
import hashlib
from functools import lru_cache
from pathlib import Path

from ..errors import CheckpointMismatchError, InputError, ModelNotFoundError
from ..errors import LinfusionError
from ..inputs import regular_file
from ..io import images  # images.open_image: a seam tests watch

# cross-attention width (text embedding dim) per family: what an adapter's shapes must match
CROSS_DIM = {"sd15": 768, "sd21": 1024, "sdxl": 2048}


def is_local(source: str) -> bool:
    """A path (exists, or looks like one) rather than a hub id 'owner/name'."""
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) \
        or source.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")) or source.count("/") != 1


def require_file(source: str, what: str) -> Path:
    """The local adapter path, or ModelNotFoundError naming the flag."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"{what}: {source} not found (not a file, folder or hub id)")
    return path


def safetensors_shapes(path: Path, what: str, dtypes: dict | None = None) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a .safetensors file without reading the tensors (their dtype names into
    `dtypes` when given); InputError if unreadable, not a regular file, or truncated."""
    if path.suffix != ".safetensors":
        raise InputError(f"{what}: {path.name} must be a .safetensors file")
    regular_file(path, what)
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            if dtypes is not None:
                dtypes.update({k: f.get_slice(k).get_dtype() for k in shapes})
            return shapes
    except Exception as exc:  # noqa: BLE001 -- SafetensorError, OSError: one line either way
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{what}: {path.name} is not a readable .safetensors file: {why}") from None


def short_hash(path: Path) -> str:
    """The first 10 hex digits of the file's sha256 (A1111's 'AutoV2' hash), once per file version."""
    stat = path.stat()
    return _hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _hash(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


def family_of_cross_dim(dim: int, cross_dim: int) -> str:
    """A readable name for the family an adapter's cross-attention width belongs to."""
    names = {v: k for k, v in CROSS_DIM.items()}
    return names.get(dim, f"a model with {dim}-dim text embeddings")


def check_image(path: str, flag: str) -> dict:
    """An adapter's reference or control image must open and decode (read again per stage)."""
    file = Path(path).expanduser()
    try:
        size = _image_size(str(file), *_version(file))
    except ModelNotFoundError:
        raise ModelNotFoundError(f"{flag}: {path} not found") from None
    except InputError as exc:
        raise InputError(f"{flag}: {exc}") from None
    return {"image": str(file), "image_size": list(size)}


def _version(file: Path) -> tuple[int, int]:
    """(size, mtime) of a file, or (-1, -1): the image cache's key beside the path."""
    try:
        st = file.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


@lru_cache(maxsize=64)
def _image_size(path: str, size: int, mtime_ns: int) -> tuple[int, int]:
    """Decode an image once per file version (a batch of 100k lines shares its control image)."""
    return images.open_image(path).size


def reason(exc: BaseException) -> str:
    """The informative line of a library error: a size mismatch named, never the advice to
    unpickle with weights_only=False (pickles are loaded only the safe way, or not at all)."""
    text = str(exc).strip()
    if "weights_only" in text or "Weights only load failed" in text:
        return "the pickle holds objects a safe (weights_only) load refuses; use a .safetensors file"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "size mismatch" in line or "shape" in line:
            return line
    return lines[0] if lines else type(exc).__name__


@contextlib.contextmanager
def loading_errors(flag: str, source: str):
    """diffusers'/peft's loader errors as one line: not found/offline (exit 2) or does not fit."""
    try:
        yield
    except LinfusionError:
        raise
    except OSError as exc:  # EnvironmentError is OSError
        raise ModelNotFoundError(f"{flag} {source}: could not be loaded (not in the local cache, "
                                 f"or offline): {reason(exc)}") from None
    except Exception as exc:  # noqa: BLE001 -- ValueError, KeyError, RuntimeError, UnpicklingError ...
        raise CheckpointMismatchError(f"{flag} {source} does not fit this model: {reason(exc)}") from None
