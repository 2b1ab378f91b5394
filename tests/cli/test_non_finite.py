"""NaN/inf out of a stage: retried in a wider dtype, or one line with the previous stage kept."""

from __future__ import annotations

from PIL import Image

from linfusion_cli.io.metadata import read_metadata

from ..cli_helpers import DEMO, LADDER, files_under, one_error, write_preset


def _poison(monkeypatch, part: str, when):
    """Make `part`'s last layer return NaN whenever when(layer, output) holds."""
    from linfusion_cli.cli import runs

    real = runs.load

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        layer = model.pipe.vae.decoder.conv_out if part == "vae" else model.pipe.unet.conv_out
        layer.register_forward_hook(lambda m, i, o: o * float("nan") if when(m, o) else o)
        return model

    monkeypatch.setattr(runs, "load", load)


def test_nan_from_the_vae_is_retried_in_float32(cli, tmp_path, monkeypatch):
    import torch

    _poison(monkeypatch, "vae", lambda m, o: m.weight.dtype != torch.float32)
    result = cli("generate", "x", *DEMO, "--res", "64", "--dtype", "bf16", "-v", "-o", "out/x.png")
    assert result.code == 0, result.err
    assert "NaN/inf from the VAE; retrying it in float32" in result.err
    with Image.open(tmp_path / "out" / "x.png") as im:
        assert max(im.convert("L").getextrema()) > 0, "not the black image NaN turns into"


def test_nan_even_in_float32_keeps_the_previous_stage(cli, tmp_path, monkeypatch):
    _poison(monkeypatch, "unet", lambda m, o: o.shape[-1] == 16)  # stage 2: 128 px, latents 16 px
    preset = write_preset(tmp_path / "l.yaml", LADDER)
    result = cli("generate", "x", "--preset", str(preset), "--res", "128", "-q", "-o", "out/x.png")
    one_error(result, "stage 2", "UNET produced NaN/inf", "stage 1's image is kept", code=1)
    kept = tmp_path / "out" / "x.png.stage1-64x64.png"
    assert files_under(tmp_path / "out") == [kept]
    assert read_metadata(kept)["record"]["stages"][0]["width"] == 64
