"""Output naming, atomic writes and metadata that AUTOMATIC1111-style readers understand."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from linfusion_cli.errors import InputError, ModelNotFoundError, OutputError
from linfusion_cli.io.images import open_image, save_image
from linfusion_cli.io.metadata import a1111_parameters, read_metadata


def make_record(**overrides):
    record = {
        "prompt": "a cat, sitting on a mat: high detail",
        "negative": "blurry, low quality",
        "steps": 25,
        "sampler": "DDIM",
        "guidance": 7.5,
        "seed": 1234,
        "width": 2048,
        "height": 1024,
        "model": "stabilityai/stable-diffusion-2-1",
        "linfusion": "Yuanshi/LinFusion-1-5",
        "stages": [
            {
                "width": 1024,
                "height": 512,
                "strength": None,
                "steps": 25,
                "seconds": 1.5,
                "peak_gib": 2.0,
            },
            {
                "width": 2048,
                "height": 1024,
                "strength": 0.4,
                "steps": 20,
                "seconds": 4.0,
                "peak_gib": 3.5,
            },
        ],
        "version": "0.1.0",
    }
    record.update(overrides)
    return record


def small_image():
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :, 0] = np.arange(64, dtype=np.uint8)[None, :] * 4
    return arr


# ---------------------------------------------------------------- naming


# ---------------------------------------------------------------- resolving


# ---------------------------------------------------------------- parameters


def test_parameters_format():
    text = a1111_parameters(make_record())
    lines = text.split("\n")
    assert lines[0] == "a cat, sitting on a mat: high detail"
    assert lines[1] == "Negative prompt: blurry, low quality"
    last = lines[-1]
    assert last.startswith("Steps: 25, Sampler: DDIM, CFG scale: 7.5, Seed: 1234, ")
    assert "Size: 2048x1024" in last and "Model: stabilityai/stable-diffusion-2-1" in last
    assert "Denoising strength: 0.4" in last
    assert "LinFusion stages: 1024x512;2048x1024@0.4" in last
    assert "Version: 0.1.0" in last
    assert '"prompt"' not in text  # the JSON record never goes into parameters


def test_parameters_without_negative_and_single_stage():
    stages = [
        {"width": 1024, "height": 1024, "strength": None, "steps": 30, "seconds": 1, "peak_gib": 1}
    ]
    record = make_record(negative="", stages=stages, linfusion=None, steps=30)
    lines = a1111_parameters(record).split("\n")
    assert len(lines) == 2 and not any(line.startswith("Negative prompt") for line in lines)
    assert lines[-1].startswith("Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 1234")
    assert "Denoising strength" not in lines[-1] and "LinFusion" not in lines[-1]


def test_parameters_quotes_values():
    record = make_record(model="C:\\models\\sd, v2", sampler="Euler\na", extra_note="plain")
    last = a1111_parameters(record).split("\n")[-1]
    assert 'Model: "C:\\\\models\\\\sd, v2"' in last
    assert 'Sampler: "Euler\\na"' in last
    assert "Extra note: plain" in last


# ---------------------------------------------------------------- saving


@pytest.mark.parametrize("fmt", ["png", "jpg", "tiff"])
def test_metadata_roundtrip(tmp_path, fmt):
    record = make_record(prompt="ünïcode, prompt: 猫\nsecond line")
    path = save_image(small_image(), tmp_path / f"x.{fmt}", record=record)
    assert path == tmp_path / f"x.{fmt}"
    meta = read_metadata(path)
    assert meta["parameters"] == a1111_parameters(record)
    assert meta["record"] == record
    with Image.open(path) as im:
        assert im.size == (64, 32)
    assert [p.name for p in tmp_path.iterdir()] == [f"x.{fmt}"]


def test_save_pil_image_and_stdout():
    record = make_record()
    for fmt in ("png", "jpg", "tiff"):
        buffer = io.BytesIO()
        assert (
            save_image(Image.new("RGB", (16, 8)), None, record=record, fmt=fmt, stream=buffer)
            is None
        )
        buffer.seek(0)
        with Image.open(buffer) as im:
            assert (
                im.size == (16, 8)
                and im.format == {"png": "PNG", "jpg": "JPEG", "tiff": "TIFF"}[fmt]
            )


def test_png_compress_level_passed(tmp_path, monkeypatch):
    seen = {}
    real_save = Image.Image.save

    def spy(self, fp, format=None, **kwargs):
        seen.update(kwargs)
        return real_save(self, fp, format, **kwargs)

    monkeypatch.setattr(Image.Image, "save", spy)
    save_image(small_image(), tmp_path / "a.png", record=make_record())
    assert seen["compress_level"] == 1
    save_image(small_image(), tmp_path / "b.png", record=make_record(), png_compress_level=6)
    assert seen["compress_level"] == 6


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_atomic_write_leaves_nothing(tmp_path, monkeypatch, exc):
    real_save = Image.Image.save

    def broken(self, fp, format=None, **kwargs):
        real_save(self, fp, format, **kwargs)  # bytes reach the temp file ...
        raise exc("interrupted")  # ... then the write dies

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(exc):
        save_image(small_image(), tmp_path / "x.png", record=make_record())
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_existing_file(tmp_path, monkeypatch):
    target = tmp_path / "x.png"
    target.write_bytes(b"precious")
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        save_image(small_image(), target, record=make_record())
    assert target.read_bytes() == b"precious"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_image(small_image(), target, record=make_record(), overwrite=True)
    assert target.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
    monkeypatch.undo()
    save_image(small_image(), target, record=make_record(), overwrite=True)
    assert read_metadata(target)["record"] == make_record()


def test_save_refuses_file_created_meanwhile(tmp_path, monkeypatch):
    target = tmp_path / "x.png"
    real_save = Image.Image.save

    def racing(self, fp, format=None, **kwargs):
        target.write_bytes(b"other writer")
        return real_save(self, fp, format, **kwargs)

    monkeypatch.setattr(Image.Image, "save", racing)
    with pytest.raises(OutputError, match="exists"):
        save_image(small_image(), target, record=make_record())
    assert target.read_bytes() == b"other writer"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


# ---------------------------------------------------------------- other readers


def _check_sd_parsers(path):
    sd_parsers = pytest.importorskip("sd_parsers")
    info = sd_parsers.ParserManager().parse(str(path))
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    sampler = info.samplers[0]
    assert sampler.name == "DDIM"
    assert sampler.prompts[0].value == "a cat, sitting on a mat: high detail"
    assert sampler.negative_prompts[0].value == "blurry, low quality"
    assert sampler.parameters["seed"] == "1234"
    assert sampler.parameters["steps"] == "25"
    assert float(sampler.parameters["cfg_scale"]) == 7.5


def _check_sd_prompt_reader(path):
    module = pytest.importorskip("sd_prompt_reader.image_data_reader")  # needs piexif too
    reader = module.ImageDataReader(str(path))
    assert reader.tool == "A1111 webUI"
    assert reader.positive == "a cat, sitting on a mat: high detail"
    assert reader.negative == "blurry, low quality"
    assert reader.parameter["seed"] == "1234"
    assert reader.parameter["steps"] == "25"
    assert float(reader.parameter["cfg"]) == 7.5
    assert reader.parameter["size"] == "2048x1024"


@pytest.mark.parametrize("fmt", ["png", "jpg"])
@pytest.mark.parametrize("check", [_check_sd_parsers, _check_sd_prompt_reader])
def test_third_party_readers(tmp_path, fmt, check):
    path = save_image(small_image(), tmp_path / f"x.{fmt}", record=make_record())
    check(path)


# ---------------------------------------------------------------- reading inputs


def test_open_image_above_pillow_limit(tmp_path):
    path = tmp_path / "big.png"
    side = 13400  # 179,560,000 px > 178,956,970, where Pillow refuses
    Image.new("1", (side, side)).save(path, compress_level=1)
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)  # what a plain Pillow read does
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = open_image(path)
    assert image.size == (side, side) and image.mode == "RGB"
    assert Image.MAX_IMAGE_PIXELS == limit  # restored for everyone else
    del image


def test_open_image_converts_and_reads(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (8, 4), 200).save(path)
    image = open_image(path)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (200, 200, 200)


def test_open_image_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="missing.png"):
        open_image(tmp_path / "missing.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(InputError, match="notes.png"):
        open_image(text)
    with pytest.raises(InputError, match="directory"):
        open_image(tmp_path)
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (256, 256), (1, 2, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(InputError, match="cut.png"):
        open_image(truncated)
