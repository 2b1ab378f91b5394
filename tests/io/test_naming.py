"""Output names: the template, its placeholders, and where -o puts a file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from linfusion_cli.errors import OutputError
from linfusion_cli.io.naming import DEFAULT_TEMPLATE, render_name, resolve_output, slugify


FIELDS = {"index": 7, "seed": 1234, "prompt": "A Cat, on a mat!", "width": 2048, "height": 1024}


def test_slug():
    assert slugify("A Cat, on a mat!") == "a-cat-on-a-mat"
    assert slugify("Café déjà vu") == "cafe-deja-vu"
    assert slugify("") == slugify("!!!") == slugify("猫") == "image"
    long = slugify("word " * 40)
    assert len(long) <= 48 and not long.endswith("-")
    assert slugify("x" * 100) == "x" * 48


def test_render_name_default_and_format_spec():
    assert render_name(DEFAULT_TEMPLATE, ext="png", **FIELDS) == "0007-1234-a-cat-on-a-mat.png"
    name = render_name("{width}x{height}_{index:03d}.{ext}", ext="jpg", **FIELDS)
    assert name == "2048x1024_007.jpg"


@pytest.mark.parametrize("template", ["{index}-{prompt}.png", "{foo}.png", "{}.png"])
def test_render_name_unknown_placeholder(template):
    with pytest.raises(OutputError, match="placeholder"):
        render_name(template, ext="png", **FIELDS)


@pytest.mark.parametrize("template", ["{index", "{slug:d}.png", "a/{seed}.png"])
def test_render_name_bad_template(template):
    with pytest.raises(OutputError):
        render_name(template, ext="png", **FIELDS)


def test_resolve_none_is_cwd_with_template(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = resolve_output(None, fields=FIELDS)
    assert path == Path("0007-1234-a-cat-on-a-mat.png")  # printed as given: the bare name in the cwd
    assert path.resolve() == tmp_path / "0007-1234-a-cat-on-a-mat.png"


def test_resolve_directory_existing_or_trailing_slash(tmp_path):
    assert resolve_output(str(tmp_path), fields=FIELDS, fmt="jpeg").name.endswith(".jpg")
    new_dir = tmp_path / "a" / "b"
    path = resolve_output(f"{new_dir}/", fields=FIELDS, fmt="tif")
    assert new_dir.is_dir() and path.parent == new_dir and path.suffix == ".tiff"


def test_resolve_file_path_and_stdout(tmp_path):
    target = tmp_path / "sub" / "out.jpg"
    assert resolve_output(str(target), fields=FIELDS) == target
    assert target.parent.is_dir()
    assert resolve_output("-", fields=FIELDS) is None
    with pytest.raises(OutputError, match="format"):
        resolve_output(str(tmp_path / "out.png"), fields=FIELDS, fmt="jpg")
    assert resolve_output(str(tmp_path / "out.v2"), fields=FIELDS, fmt="png").name == "out.v2"


def test_resolve_refuses_existing_file(tmp_path):
    existing = tmp_path / "out.png"
    existing.write_bytes(b"old")
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        resolve_output(str(existing), fields=FIELDS)
    assert resolve_output(str(existing), fields=FIELDS, overwrite=True) == existing
    (tmp_path / "0007-1234-a-cat-on-a-mat.png").write_bytes(b"old")
    with pytest.raises(OutputError, match="exists"):
        resolve_output(str(tmp_path), fields=FIELDS)


@pytest.mark.parametrize("fmt", ["webp", "bmp"])
def test_resolve_refuses_formats(tmp_path, fmt):
    with pytest.raises(OutputError, match="WebP" if fmt == "webp" else "unknown"):
        resolve_output(str(tmp_path), fields=FIELDS, fmt=fmt)
    with pytest.raises(OutputError):
        resolve_output(str(tmp_path / f"x.{fmt}"), fields=FIELDS)


def test_resolve_refuses_unwritable_directory(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(OutputError, match="cannot create"):
        resolve_output(str(blocker / "sub" / "x.png"), fields=FIELDS)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == ro else real_access(p, m))
    with pytest.raises(OutputError, match="cannot write"):
        resolve_output(str(ro / "x.png"), fields=FIELDS)
