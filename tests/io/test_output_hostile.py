"""Metadata that cannot forge or overflow, input images of every mode, signals during a write."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from PIL import Image

from linfusion_cli import interrupts
from linfusion_cli.io.images import open_image, save_image, to_rgb8
from linfusion_cli.io.metadata import a1111_parameters, read_metadata

from ..cli_helpers import parameters_fields


def record(prompt: str, negative: str = "blurry") -> dict:
    return {"prompt": prompt, "negative": negative, "seed": 7, "steps": 20, "sampler": "DDIM",
            "guidance": 7.5, "width": 64, "height": 64, "model": "demo", "linfusion": "fresh",
            "stages": [{"width": 64, "height": 64, "strength": None, "steps": 20}]}


def a1111_read(parameters: str) -> tuple[str, str, dict]:
    """How A1111-style readers split `parameters`: last line settings, 'Negative prompt:' lines."""
    lines = parameters.split("\n")
    settings, prompt, negative, in_negative = lines[-1], [], [], False
    for line in lines[:-1]:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), parameters_fields(settings)


@pytest.mark.parametrize("prompt", ["a cat\nNegative prompt: forged", "a cat\r\nSteps: 999, Seed: 1",
                                    "a cat\u2028Negative prompt: forged"])
def test_prompt_cannot_forge_parameters(prompt):
    params = a1111_parameters(record(prompt))
    text, negative, fields = a1111_read(params)
    assert negative == "blurry"
    assert fields["Seed"] == "7" and fields["Steps"] == "20"
    assert "forged" not in negative and text.startswith("a cat")
    assert len(params.splitlines()) == 3


@pytest.mark.parametrize("fmt", ["jpg", "png", "tiff"])
def test_huge_prompt_metadata_is_shortened_never_lost(tmp_path, fmt):
    prompt = "a very long prompt " * 2200  # ~42,000 characters
    path = save_image(np.zeros((64, 64, 3), np.uint8), tmp_path / f"x.{fmt}", record=record(prompt))
    with Image.open(path) as im:
        im.load()
    meta = read_metadata(path)
    if fmt == "jpg":  # one EXIF segment: the settings whole, the prompt cut with a note
        assert "shortened to fit this format" in meta["parameters"]
        assert parameters_fields(meta["parameters"].splitlines()[-1])["Seed"] == "7"
        assert len(meta["parameters"]) < 32768
    else:  # PNG and TIFF hold it all
        assert meta["record"]["prompt"] == prompt


def test_16_bit_grey_png_keeps_its_levels(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    rgb = np.asarray(open_image(tmp_path / "g16.png"))
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    expected = np.rint(ramp / 65535 * 255).astype(np.uint8)
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] >= 254


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_float_tiff_is_not_black(tmp_path, scale):
    values = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64) * scale
    Image.fromarray(values, "F").save(tmp_path / "f.tiff")
    rgb = np.asarray(open_image(tmp_path / "f.tiff"))
    assert rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255
    assert abs(int(rgb[32, 0, 0]) - round(values[32, 0] / scale * 255)) <= 1


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (80, 40), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 40, 40))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = open_image(tmp_path / "rotated.jpg")
    assert upright.size == (40, 80)
    top = np.asarray(upright)[5, 20]
    assert top[0] > 200 and top[2] < 60, "the red half is on top after the rotation"


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "PA", "CMYK", "L", "1", "I;16", "I", "F", "YCbCr"])
def test_every_mode_becomes_8_bit_rgb(mode):
    base = Image.new("RGB", (16, 16), (200, 100, 50))
    im = base.convert(mode) if mode not in ("I;16", "I", "F", "PA") else base.convert("L").convert(mode) \
        if mode != "PA" else base.convert("P").convert("PA")
    out = to_rgb8(im)
    assert out.mode == "RGB" and out.size == (16, 16)


def test_transparent_pixels_flatten_on_white():
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb8(im)).min() == 255


def test_signal_during_the_publish_step_is_raised_after_it(tmp_path, monkeypatch):
    """A signal inside interrupts.critical() waits for the step: the file is whole, no temp left."""
    from linfusion_cli.io import images

    real = images._publish

    def publish(tmp, path, overwrite):
        interrupts.handle(signal.SIGTERM)  # as if it arrived right now
        real(tmp, path, overwrite)

    monkeypatch.setattr(images, "_publish", publish)
    with pytest.raises(interrupts.Interrupted) as info:
        save_image(np.zeros((8, 8, 3), np.uint8), tmp_path / "x.png", record=record("x"))
    assert info.value.exit_code == 143
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
    with Image.open(tmp_path / "x.png") as im:
        im.load()
