"""Output file names: prompt slugs, the user's name template, the format from a suffix."""

from __future__ import annotations

import os
import re
import string
import unicodedata
from pathlib import Path
from typing import Any

from ..errors import OutputError
from .targets import check_directory, check_target

DEFAULT_TEMPLATE = "{index:04d}-{seed}-{slug}.{ext}"
FIELDS = ("index", "seed", "slug", "width", "height", "ext")
FIELDS_HELP = ", ".join("{" + f + "}" for f in FIELDS)
FORMATS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "tiff": "tiff", "tif": "tiff"}
SLUG_MAX = 48
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0 (newline and tab too), DEL, C1


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


def _suffix_agrees(template: str, path: Path, ext: str, fmt: str | None) -> None:
    """A name's suffix decides the format: {ext} and --format must say the same, never another."""
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in FORMATS or FORMATS[suffix] == ext:
        return
    if fmt is not None:
        raise OutputError(f"--name {template!r} gives {path.name}, whose suffix {path.suffix} is not "
                          f"the format {ext}; end the name with .{{ext}} or drop --format")
    if "{ext" in template:
        raise OutputError(f"--name {template!r} gives {path.name}: {{ext}} is {ext} but the suffix "
                          f"{path.suffix} decides the format; drop one, or pass --format {FORMATS[suffix]}")


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

    The path is the one printed: -o as written joined with the file name (relative paths stay
    relative to the current folder); without -o, the bare file name in the current folder.

    create=False (a dry run) checks the folder could be made but makes nothing.
    """
    if output == "-":
        format_of(None, fmt)
        return None
    is_dir = output is None or output.endswith(("/", os.sep)) or Path(output).is_dir()
    if is_dir:
        ext = format_of(None, fmt)
        # paths are shown as given: -o's folder as written, else the current one (".")
        directory = Path(output) if output is not None else Path()
        path = directory / render_name(template, ext=ext, **fields)
        _suffix_agrees(template, path, ext, fmt)
    else:
        path = Path(output)
        fmt_name = format_of(path, fmt)
        suffix = path.suffix.lower().lstrip(".")
        if fmt is not None and suffix in FORMATS and FORMATS[suffix] != fmt_name:
            raise OutputError(f"{path} has suffix {path.suffix} but the format is {fmt_name}")
        directory = path.parent
    if _CONTROLS.search(str(path)):  # it would be echoed on the terminal and on stdout
        raise OutputError(f"output path {ascii(str(path))} has control characters; pick another name")
    check_directory(directory, create=create)
    check_target(path, overwrite=overwrite)
    return path


