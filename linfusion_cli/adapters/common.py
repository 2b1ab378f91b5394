"""Shared checks for adapter files: local or hub id, readable, and the model family they fit."""

from __future__ import annotations

import contextlib
import hashlib
from functools import lru_cache
from pathlib import Path

from ..errors import CheckpointMismatchError, InputError, ModelNotFoundError

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


def safetensors_shapes(path: Path, what: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a .safetensors file without reading the tensors; InputError if unreadable."""
    if path.suffix != ".safetensors":
        raise InputError(f"{what}: {path.name} must be a .safetensors file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
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
    from ..io.images import open_image

    try:
        image = open_image(path)
    except ModelNotFoundError:
        raise ModelNotFoundError(f"{flag}: {path} not found") from None
    except InputError as exc:
        raise InputError(f"{flag}: {exc}") from None
    return {"image": str(Path(path).expanduser()), "image_size": list(image.size)}


@contextlib.contextmanager
def loading_errors(flag: str, source: str):
    """diffusers' loader errors as one line: not found/offline (exit 2) or does not fit the model."""
    try:
        yield
    except OSError as exc:  # EnvironmentError is OSError
        raise ModelNotFoundError(f"{flag} {source}: could not be loaded (not in the local cache, "
                                 f"or offline): {str(exc).strip().splitlines()[0]}") from None
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointMismatchError(f"{flag} {source} does not fit this model: "
                                      f"{str(exc).strip().splitlines()[0]}") from None
