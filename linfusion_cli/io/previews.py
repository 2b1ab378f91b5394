"""The live preview file (--preview): its name per batch entry, its checks, its atomic rewrites.

A preview is rewritten many times while a run goes; every rewrite goes through a temporary file
in the same folder and os.replace, so an image viewer that reloads on change never reads half a
file. Each preview carries a marker (a PNG text chunk, a JPEG comment), so a later run may replace
its own previews but never, without --overwrite, some other image that happens to have the name.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import string
from pathlib import Path

from PIL import Image, PngImagePlugin

from ..errors import InputError, OutputError, WriteError
from ..validate import file_name
from .images import _owner, clean_stale_parts

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
MARK = "linfusion-preview"  # the PNG text key / JPEG comment that says "a preview, replaceable"
FIELDS = ("index", "name")  # batch: the entry's index, its output file's name without the suffix
FLAG = "--preview"


def preview_format(path: str | os.PathLike) -> str:
    """PIL's format name for the preview's suffix; other suffixes are refused."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"{FLAG} {path}: name a .png or .jpg file (the preview is an image)")
    return FORMATS[suffix]


def is_template(path: str) -> bool:
    """The path names batch fields ({index}, {name})."""
    return any(field is not None for _, field, _, _ in _parsed(path))


def _parsed(path: str) -> list:
    try:
        return list(string.Formatter().parse(path))
    except ValueError as exc:
        raise InputError(f"{FLAG} {path!r}: {exc}") from None


def entry_path(template: str, *, index: int, name: str) -> str:
    """A batch entry's preview: {index} and {name} filled (format specs allowed, e.g.
    {index:04d}); a path without them gets -INDEX (4 digits) before its suffix."""
    parsed = _parsed(template)
    fields = [(f, spec) for _, f, spec, _ in parsed if f is not None]
    if not fields:
        path = Path(template)
        return str(path.with_name(f"{path.stem}-{index:04d}{path.suffix}"))
    for field, spec in fields:
        if field not in FIELDS:
            shown = "{" + field + "}" if field else "{}"
            raise InputError(f"{FLAG} {template!r}: unknown field {shown}; use {{index}} or {{name}}")
        if re.search(r"\d{4,}", spec or ""):
            raise InputError(f"{FLAG} {template!r}: width in {{{field}:{spec}}} is above 999")
    try:
        rendered = template.format(index=index, name=name)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise InputError(f"{FLAG} {template!r}: {exc}") from None
    if Path(rendered).parent != Path(template).parent:
        raise InputError(f"{FLAG} {template!r}: put {{index}}/{{name}} in the file name, not the folder")
    return rendered


def check_folder(path: str | os.PathLike) -> None:
    """Before any model loads: the preview's folder exists and is writable, its suffix an image's."""
    path = Path(path)
    preview_format(path)
    folder = path.parent
    if "\n" in str(path) or "\r" in str(path):
        raise InputError(f"{FLAG} {str(path)[:60]!r} contains a line break; pick a name without one")
    file_name(path.name, f"{FLAG} {path}")
    if not folder.exists():
        raise InputError(f"{FLAG} {path}: folder {folder} does not exist")
    if not folder.is_dir():
        raise InputError(f"{FLAG} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{FLAG} {path}: cannot write to folder {folder}")


def check_target(path: str | os.PathLike, *, overwrite: bool = True, taken=()) -> None:
    """The preview file itself: not a folder, link or special file; not one of the run's own
    images (`taken`: the output, stage files, checkpoints); an existing file that is no preview
    of ours is replaced only with overwrite."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as exc:
        raise InputError(f"cannot use {FLAG} {path}: {exc.strerror or exc}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"{FLAG} {path} is a directory; name an image file in it "
                             f"(e.g. {path / 'preview.png'})")
        if stat.S_ISLNK(st.st_mode):
            raise InputError(f"{FLAG} {path} is a symbolic link; refusing to write through it")
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{FLAG} {path} is not a regular file; refusing to write there")
    check_folder(path)
    real = os.path.realpath(path)
    for other in taken:
        if other is not None and os.path.realpath(other) == real:
            raise OutputError(f"{FLAG} {path} is also {other}, an image this run writes; pick another name")
    if st is not None and not overwrite and not is_preview(path):
        raise OutputError(f"{FLAG} {path} exists and is not a linfusion preview; pass --overwrite "
                          "or pick another name")


def is_preview(path: Path) -> bool:
    """The file carries our preview marker."""
    try:
        with Image.open(path) as im:
            comment = im.info.get("comment", b"")
            return im.info.get(MARK) == "1" or comment in (MARK, MARK.encode())
    except Exception:  # noqa: BLE001 -- unreadable, truncated or foreign: not ours
        return False


def start(path: str | os.PathLike) -> None:
    """Before a run's first preview: temporary files that killed runs left beside it go."""
    clean_stale_parts(Path(path))


def write(image: Image.Image, path: str | os.PathLike) -> None:
    """Write the preview atomically: a temporary file in the same folder, then os.replace."""
    path = Path(path)
    fmt = preview_format(path)
    tmp = path.with_name(f".{path.name}.{_owner()}.{secrets.token_hex(4)}.part")
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text(MARK, "1")
        options = dict(pnginfo=info, compress_level=1)
    else:
        options = dict(quality=90, comment=MARK.encode())
    try:
        with open(tmp, "xb") as fh:
            image.save(fh, format=fmt, **options)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write the preview {path}: {exc.strerror or exc}") from None
        raise
