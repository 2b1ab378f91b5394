"""Run metadata inside image files: A1111's `parameters` text and our JSON run record.

Each format's writer sits beside its reader, so what one stores the other reads back:
PNG text chunks, JPEG EXIF (UserComment + MakerNote), TIFF ImageDescription + a private tag.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin, TiffImagePlugin

from .opening import open_lazily
from .adapter_text import a1111_fields, prompt_tags

_TIFF_RECORD_TAG = 65000  # private tag holding the JSON run record
_EXIF_IFD, _USER_COMMENT, _MAKER_NOTE = 0x8769, 0x9286, 0x927C
_UNICODE_PREFIX = b"UNICODE\0"
_JPEG_EXIF_MAX = 65533  # one APP1 segment


# ---------------------------------------------------------------- the A1111 text


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


# ---------------------------------------------------------------- PNG: two text chunks


def _png_write(record: dict[str, Any], parameters: str, record_json: str, png_compress_level: int) -> dict:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("linfusion", record_json)
    return {"pnginfo": info, "compress_level": png_compress_level}


def _png_read(im: Image.Image) -> tuple[str | None, Any]:
    return im.info.get("parameters"), im.info.get("linfusion")


# ---------------------------------------------------------------- JPEG: EXIF UserComment + MakerNote


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


def _jpeg_write(record: dict[str, Any], parameters: str, record_json: str, png_compress_level: int) -> dict:
    comment = _UNICODE_PREFIX + parameters.encode("utf-16-be")
    exif = _exif_bytes({_USER_COMMENT: comment, _MAKER_NOTE: record_json.encode()})
    if len(exif) > _JPEG_EXIF_MAX:  # one JPEG segment; keep what readers need
        exif = _exif_bytes({_USER_COMMENT: comment})
    if len(exif) > _JPEG_EXIF_MAX:  # a prompt too long for the segment: shortened, with a note
        room = (_JPEG_EXIF_MAX - len(_exif_bytes({_USER_COMMENT: _UNICODE_PREFIX}))) // 4
        comment = _UNICODE_PREFIX + shorten_parameters(record, room).encode("utf-16-be")
        exif = _exif_bytes({_USER_COMMENT: comment})
    return {"quality": 95, "exif": exif}


def _jpeg_read(im: Image.Image) -> tuple[str | None, Any]:
    exif = im.getexif().get_ifd(_EXIF_IFD)
    comment, parameters = exif.get(_USER_COMMENT), None
    if isinstance(comment, bytes) and comment.startswith(_UNICODE_PREFIX):
        parameters = comment[len(_UNICODE_PREFIX) :].decode("utf-16-be")
    elif isinstance(comment, bytes):
        parameters = comment[8:].decode("utf-8", "replace")
    return parameters, _utf8(exif.get(_MAKER_NOTE))


# ---------------------------------------------------------------- TIFF: ImageDescription + private tag


def _tiff_write(record: dict[str, Any], parameters: str, record_json: str, png_compress_level: int) -> dict:
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[270] = parameters.encode()  # ASCII tag; Pillow would replace non-ASCII with '?'
    ifd[305] = "linfusion-cli"
    ifd[_TIFF_RECORD_TAG] = record_json.encode()
    ifd.tagtype[_TIFF_RECORD_TAG] = 7
    return {"tiffinfo": ifd, "compression": "tiff_adobe_deflate"}


def _tiff_read(im: Image.Image) -> tuple[str | None, Any]:
    return _utf8(im.tag_v2.get(270)), _utf8(im.tag_v2.get(_TIFF_RECORD_TAG))


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


# ---------------------------------------------------------------- by format

_WRITERS = {"png": _png_write, "jpg": _jpeg_write, "tiff": _tiff_write}
_READERS = {"PNG": _png_read, "JPEG": _jpeg_read, "TIFF": _tiff_read}  # by PIL's format name


def save_kwargs(fmt: str, record: dict[str, Any], png_compress_level: int) -> dict[str, Any]:
    """Pillow save options that embed `parameters` and the JSON record in format `fmt`."""
    record_json = json.dumps(record, ensure_ascii=False)
    return _WRITERS[fmt](record, a1111_parameters(record), record_json, png_compress_level)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """`parameters` text and JSON run record of one of our images (for tests and --resume)."""
    with open_lazily(Path(path)) as im:
        reader = _READERS.get(im.format)
        parameters, raw_record = reader(im) if reader else (None, None)
    try:
        record = json.loads(raw_record) if raw_record else None
    except ValueError:
        record = None
    return {"parameters": parameters, "record": record if isinstance(record, dict) else None}
