"""Output files: naming, format choice, atomic writes and metadata other tools can read."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import secrets
import string
import struct
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, PngImagePlugin, TiffImagePlugin

from .. import interrupts
from ..errors import InputError, ModelNotFoundError, OutputError, WriteError
from .targets import check_directory, check_target

DEFAULT_TEMPLATE = "{index:04d}-{seed}-{slug}.{ext}"
FIELDS = ("index", "seed", "slug", "width", "height", "ext")
FIELDS_HELP = ", ".join("{" + f + "}" for f in FIELDS)
FORMATS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "tiff": "tiff", "tif": "tiff"}
PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "tiff": "TIFF"}
SLUG_MAX = 48
# Pillow refuses > 2 * MAX_IMAGE_PIXELS; our largest images are 16384 x 16384.
MAX_PIXELS = int(16384 * 16384 * 1.1)
_TIFF_RECORD_TAG = 65000  # private tag holding the JSON run record
_EXIF_IFD, _USER_COMMENT, _MAKER_NOTE = 0x8769, 0x9286, 0x927C
_UNICODE_PREFIX = b"UNICODE\0"
_JPEG_EXIF_MAX = 65533  # one APP1 segment


# ---------------------------------------------------------------- naming


def slugify(prompt: str, limit: int = SLUG_MAX) -> str:
    """A file-name-safe summary of a prompt, so files sort and read well in a shell."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    slug = ""
    for word in re.findall(r"[a-z0-9]+", ascii_text.lower()):
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > limit:
            slug = slug or word[:limit]
            break
        slug = candidate
    return slug or "image"


def render_name(
    template: str, *, index: int, seed: int, prompt: str, width: int, height: int, ext: str
) -> str:
    """Fill a user's file-name template; unknown placeholders fail before any generation."""
    try:
        parsed = [(f, spec) for _, f, spec, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise OutputError(f"bad output template {template!r}: {exc}") from None
    names = [f for f, _ in parsed]
    for f, spec in parsed:  # {index:99999999d} would build a gigabyte-long name
        if re.search(r"\d{4,}", spec or ""):
            raise OutputError(f"output template {template!r}: width in {{{f}:{spec}}} is above 999")
    for name in names:
        if name not in FIELDS:
            shown = "{" + name + "}" if name else "{}"
            raise OutputError(f"unknown placeholder {shown} in output template; use {FIELDS_HELP}")
    slug = slugify(prompt)
    values = {
        "index": index,
        "seed": seed,
        "slug": slug,
        "width": width,
        "height": height,
        "ext": ext,
    }
    try:
        name = template.format(**values)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise OutputError(f"bad output template {template!r}: {exc}") from None
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise OutputError(f"output template {template!r} must give a plain file name, got {name!r}")
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        raise OutputError(f"output template {template!r} gives a name over 255 bytes")
    return name


def normalize_format(fmt: str) -> str:
    """Canonical format name (png, jpg, tiff); refuses formats that cannot hold 16K images."""
    key = fmt.lower().lstrip(".")
    if key == "webp":
        raise OutputError("WebP cannot hold images above 16383 px; use png, jpg or tiff")
    if key not in FORMATS:
        raise OutputError(f"unknown image format {fmt!r}; use png, jpg or tiff")
    return FORMATS[key]


def format_of(path: Path | None, fmt: str | None = None) -> str:
    """The format to write: the explicit one, else the path's suffix, else PNG."""
    if fmt is not None:
        return normalize_format(fmt)
    if path is not None and path.suffix:
        return normalize_format(path.suffix)
    return "png"


def resolve_output(
    output: str | None,
    *,
    template: str = DEFAULT_TEMPLATE,
    fields: dict[str, Any],
    fmt: str | None = None,
    overwrite: bool = False,
    create: bool = True,
) -> Path | None:
    """Where one image goes (None: stdout); checks early so a long run never fails at the end.

    create=False (a dry run) checks the folder could be made but makes nothing.
    """
    if output == "-":
        format_of(None, fmt)
        return None
    is_dir = output is None or output.endswith(("/", os.sep)) or Path(output).is_dir()
    if is_dir:
        ext = format_of(None, fmt)
        directory = Path(output) if output is not None else Path.cwd()
        path = directory / render_name(template, ext=ext, **fields)
    else:
        path = Path(output)
        fmt_name = format_of(path, fmt)
        suffix = path.suffix.lower().lstrip(".")
        if fmt is not None and suffix in FORMATS and FORMATS[suffix] != fmt_name:
            raise OutputError(f"{path} has suffix {path.suffix} but the format is {fmt_name}")
        directory = path.parent
    check_directory(directory, create=create)
    check_target(path, overwrite=overwrite)
    return path


# ---------------------------------------------------------------- metadata


def _quote(value: Any) -> str:
    """AUTOMATIC1111's quoting: JSON-quote values that would break the `k: v, ...` line."""
    text = str(value)
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


_KNOWN = {
    "prompt", "negative", "steps", "sampler", "guidance", "seed", "width", "height",
    "model", "linfusion", "stages", "adapters",
}  # fmt: skip


def _stage_label(stage: dict[str, Any]) -> str:
    """`WxH` or `WxH@strength`; joined by ';' so sd-parsers needs no JSON unquoting."""
    label = f"{stage['width']}x{stage['height']}"
    return label if stage.get("strength") is None else f"{label}@{stage['strength']:g}"


def a1111_parameters(record: dict[str, Any]) -> str:
    """The AUTOMATIC1111 `parameters` text, the de-facto format image viewers and parsers read."""
    stages = record.get("stages") or []
    steps = record.get("steps")
    if steps is None and stages:
        steps = stages[0].get("steps")
    guidance = record.get("guidance")
    params: dict[str, Any] = {
        "Steps": steps,
        "Sampler": record.get("sampler"),
        "CFG scale": float(guidance) if guidance is not None else None,
        "Seed": record.get("seed"),
        "Size": f"{record.get('width')}x{record.get('height')}",
        "Model": record.get("model"),
        "Denoising strength": stages[-1].get("strength") if stages else None,
        "LinFusion": record.get("linfusion"),
        "LinFusion stages": ";".join(_stage_label(s) for s in stages) if len(stages) > 1 else None,
    }
    from ..adapters.metadata import a1111_fields, prompt_tags

    params.update(a1111_fields(record.get("adapters") or {}))
    for key, value in record.items():
        if key not in _KNOWN and isinstance(value, (str, int, float, bool)):
            params.setdefault(key.replace("_", " ").capitalize(), value)
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    lines = [one_line(record.get("prompt") or "") + prompt_tags(record.get("adapters") or {})]
    if record.get("negative"):
        lines.append(f"Negative prompt: {one_line(record['negative'])}")
    lines.append(line)
    return "\n".join(lines)


def one_line(text: Any) -> str:
    """A prompt on one line: A1111 readers split `parameters` on line breaks, so a prompt holding
    "\nNegative prompt: ..." or "\nSteps: ..." would forge those fields. Breaks become spaces (what
    the tokenizer makes of them too); the JSON record keeps the prompt as given."""
    return " ".join(str(text).splitlines())


def shorten_parameters(record: dict[str, Any], limit: int) -> str:
    """`parameters` in at most `limit` characters: the prompts cut, with a note, the settings whole."""
    full = a1111_parameters(record)
    if len(full) <= limit:
        return full
    note = " [shortened to fit this format]"
    prompt, negative = str(record.get("prompt") or ""), str(record.get("negative") or "")
    settings = len(a1111_parameters(dict(record, prompt="", negative="")))
    room = max(0, limit - settings - 2 * len(note) - len("\nNegative prompt: "))
    keep_neg = min(len(negative), room // 2 if len(prompt) > room // 2 else room - len(prompt))
    keep_prompt = min(len(prompt), room - keep_neg)
    cut = lambda text, keep: text if keep >= len(text) else text[:keep] + note  # noqa: E731
    return a1111_parameters(dict(record, prompt=cut(prompt, keep_prompt), negative=cut(negative, keep_neg)))


def _exif_bytes(entries: dict[int, bytes]) -> bytes:
    """A minimal EXIF block (IFD0 -> Exif IFD of UNDEFINED tags); Pillow would type them BYTE."""
    exif_ifd_at = 8 + 2 + 12 + 4
    data_at = exif_ifd_at + 2 + 12 * len(entries) + 4
    head = b"MM\0*" + struct.pack(">I", 8)
    ifd0 = struct.pack(">H", 1) + struct.pack(">HHII", _EXIF_IFD, 4, 1, exif_ifd_at) + b"\0" * 4
    table, data = struct.pack(">H", len(entries)), b""
    for tag in sorted(entries):
        value = entries[tag]
        if len(value) <= 4:
            table += struct.pack(">HHI", tag, 7, len(value)) + value.ljust(4, b"\0")
        else:
            table += struct.pack(">HHII", tag, 7, len(value), data_at + len(data))
            data += value + (b"\0" if len(value) % 2 else b"")
    return b"Exif\0\0" + head + ifd0 + table + b"\0" * 4 + data


def _save_kwargs(fmt: str, record: dict[str, Any], png_compress_level: int) -> dict[str, Any]:
    """Pillow save options that embed `parameters` and the JSON record for each format."""
    parameters = a1111_parameters(record)
    record_json = json.dumps(record, ensure_ascii=False)
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        info.add_text("linfusion", record_json)
        return {"pnginfo": info, "compress_level": png_compress_level}
    if fmt == "jpg":
        comment = _UNICODE_PREFIX + parameters.encode("utf-16-be")
        exif = _exif_bytes({_USER_COMMENT: comment, _MAKER_NOTE: record_json.encode()})
        if len(exif) > _JPEG_EXIF_MAX:  # one JPEG segment; keep what readers need
            exif = _exif_bytes({_USER_COMMENT: comment})
        if len(exif) > _JPEG_EXIF_MAX:  # a prompt too long for the segment: shortened, with a note
            room = (_JPEG_EXIF_MAX - len(_exif_bytes({_USER_COMMENT: _UNICODE_PREFIX}))) // 4
            comment = _UNICODE_PREFIX + shorten_parameters(record, room).encode("utf-16-be")
            exif = _exif_bytes({_USER_COMMENT: comment})
        return {"quality": 95, "exif": exif}
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[270] = parameters.encode()  # ASCII tag; Pillow would replace non-ASCII with '?'
    ifd[305] = "linfusion-cli"
    ifd[_TIFF_RECORD_TAG] = record_json.encode()
    ifd.tagtype[_TIFF_RECORD_TAG] = 7
    return {"tiffinfo": ifd, "compression": "tiff_adobe_deflate"}


def _utf8(text: Any) -> str | None:
    """Undo Pillow's latin-1 decoding of the UTF-8 bytes we stored."""
    if text is None:
        return None
    if isinstance(text, bytes):
        return text.decode("utf-8", "replace")
    try:
        return str(text).encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return str(text)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """`parameters` text and JSON run record of one of our images (for tests and --resume)."""
    with _open(Path(path)) as im:
        parameters: str | None = None
        raw_record: Any = None
        if im.format == "PNG":
            parameters, raw_record = im.info.get("parameters"), im.info.get("linfusion")
        elif im.format == "JPEG":
            exif = im.getexif().get_ifd(_EXIF_IFD)
            comment = exif.get(_USER_COMMENT)
            if isinstance(comment, bytes) and comment.startswith(_UNICODE_PREFIX):
                parameters = comment[len(_UNICODE_PREFIX) :].decode("utf-16-be")
            elif isinstance(comment, bytes):
                parameters = comment[8:].decode("utf-8", "replace")
            raw_record = _utf8(exif.get(_MAKER_NOTE))
        elif im.format == "TIFF":
            parameters = _utf8(im.tag_v2.get(270))
            raw_record = _utf8(im.tag_v2.get(_TIFF_RECORD_TAG))
    try:
        record = json.loads(raw_record) if raw_record else None
    except ValueError:
        record = None
    return {"parameters": parameters, "record": record if isinstance(record, dict) else None}


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
    kwargs = _save_kwargs(fmt_name, record, png_compress_level)
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
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
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


@contextlib.contextmanager
def _large_images_allowed() -> Iterator[None]:
    """Raise Pillow's decompression-bomb limit so 16K images open (it errs above 2x the limit)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(saved or 0, MAX_PIXELS) if saved is not None else None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _open(path: Path) -> Image.Image:
    """Open an image lazily with one-line errors that name the path."""
    if not path.exists():
        raise ModelNotFoundError(f"image not found: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not an image")
    with _large_images_allowed():
        try:
            return Image.open(path)
        except Image.DecompressionBombError:
            raise InputError(f"{path} is too large (over {MAX_PIXELS * 2} pixels)") from None
        except Image.UnidentifiedImageError:
            raise InputError(f"{path} is not an image Pillow can read") from None
        except (OSError, ValueError, SyntaxError) as exc:  # ValueError: a PNG text bomb
            raise InputError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def open_image(path: str | os.PathLike) -> Image.Image:
    """Load a user's input image as RGB, allowing 16K sizes that Pillow refuses by default."""
    path = Path(path)
    im = _open(path)
    try:
        with _large_images_allowed():
            im.load()  # reads and closes the file; no copy for RGB inputs
            return to_rgb8(im)
    except (OSError, SyntaxError, ValueError) as exc:
        im.close()
        raise InputError(f"cannot read {path}: {exc}") from None


def to_rgb8(im: Image.Image) -> Image.Image:
    """Any mode Pillow opens as 8-bit RGB, upright: 16-bit and float values scaled (not clipped),
    alpha flattened on white, palettes and CMYK converted, the EXIF orientation applied."""
    from PIL import ImageOps

    import numpy as np

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
