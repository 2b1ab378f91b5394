"""DemoFusion's pieces against written-out references: step weights, the Gaussian blur, dilated
convolutions, the Euler denoise loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from linfusion_cli.pipeline import demofusion as df
from linfusion_cli.planning.method import DemoFusion, denoise_steps, trained_px


def ref_weights(t: float, T: int, s1: float, s2: float, s3: float) -> tuple[float, float, float, float]:
    """The equations, in double precision."""
    c = (1 + math.cos(math.pi * (T - t) / T)) / 2
    return c, c ** s1, c ** s2, 0.99 * c ** s3 + 0.01


def test_step_weights_over_an_euler_schedule_match_the_equations():
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched.set_timesteps(50)
    timesteps = sched.timesteps[34:]  # strength 0.32 of 50 steps
    got = [df.step_weights(t, 1000, 3.0, 1.0, 1.0) for t in timesteps]
    assert len(got) == 16
    for t, w in zip(timesteps.tolist(), got):
        c, c1, c2, c3 = ref_weights(t, 1000, 3.0, 1.0, 1.0)
        assert w.cosine == pytest.approx(c, abs=1e-6)
        assert (w.skip, w.dilated, w.sigma_scale) == pytest.approx((c1, c2, c3), abs=1e-6)
    assert all(a.skip > b.skip for a, b in zip(got, got[1:])), "the skip residual fades as t falls"
    assert df.step_weights(1000, 1000, 3, 1, 1).cosine == pytest.approx(1.0)
    assert df.step_weights(0, 1000, 3, 1, 1).skip == pytest.approx(0.0, abs=1e-12)
    assert df.step_weights(300, 1000, math.inf, math.inf, 1).skip == 0.0  # weight exactly 0


def ref_blur(x: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
    """Per channel, per pixel: sum over the k x k window of exp(-(dy^2 + dx^2) / 2 sigma^2),
    normalised, zero outside the image."""
    r = (k - 1) / 2
    w = [[math.exp(-((i - r) ** 2 + (j - r) ** 2) / (2 * sigma ** 2)) for j in range(k)] for i in range(k)]
    total = sum(map(sum, w))
    b, c, h, wd = x.shape
    out = torch.zeros_like(x, dtype=torch.float64)
    for n in range(b):
        for ch in range(c):
            for y in range(h):
                for xx in range(wd):
                    acc = 0.0
                    for i in range(k):
                        for j in range(k):
                            yy, xj = y + i - k // 2, xx + j - k // 2
                            if 0 <= yy < h and 0 <= xj < wd:
                                acc += w[i][j] / total * float(x[n, ch, yy, xj])
                    out[n, ch, y, xx] = acc
    return out


@pytest.mark.parametrize("k,sigma", [(3, 0.8), (5, 0.8 * 0.37), (7, 1.3), (1, 0.5)])
def test_gaussian_blur_matches_the_written_out_filter(k, sigma):
    x = torch.randn(1, 2, 7, 9, generator=torch.Generator().manual_seed(k))
    got = df.gaussian_blur(x, k, sigma)
    assert got.shape == x.shape
    torch.testing.assert_close(got.double(), ref_blur(x, k, sigma), atol=1e-6, rtol=1e-6)


def test_blurred_input_keeps_each_channel_mean_and_std():
    x = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(3)) * 3 + 1
    y = df.blurred_input(x, 4, 0.8)
    assert not torch.allclose(y, x)
    torch.testing.assert_close(y.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(2, 3)), x.std(dim=(2, 3)), atol=1e-5, rtol=1e-5)


def ref_dilated_conv(conv: nn.Conv2d, x: torch.Tensor, s: int) -> torch.Tensor:
    """A stride-1 k x k conv dilated by s with padding scaled by s, written out: the undilated
    conv run on every s x s phase subgrid x[..., i::s, j::s], outputs put back in place."""
    out = torch.zeros(x.shape[0], conv.out_channels, *x.shape[2:])
    for i in range(s):
        for j in range(s):
            out[..., i::s, j::s] = conv(x[..., i::s, j::s])
    return out


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_dilated_convs_equal_the_conv_on_phase_subgrids_and_restore(scale):
    torch.manual_seed(scale)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.SiLU(), nn.Conv2d(5, 2, 1))
    conv = model[0]
    x = torch.randn(1, 3, 13, 11)
    with torch.no_grad():
        expected = ref_dilated_conv(conv, x, scale)
        with df.dilated_convs(model, scale):
            assert conv.dilation == (scale, scale) and conv.padding == (scale, scale)
            assert model[2].dilation == (scale, scale) and model[2].padding == (0, 0)
            got = conv(x)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
        assert conv.dilation == (1, 1) and conv.padding == (1, 1)
    with pytest.raises(RuntimeError):
        with df.dilated_convs(model, scale):
            raise RuntimeError("boom")
    assert conv.dilation == (1, 1) and conv.padding == (1, 1), "restored after an error too"


def test_dilated_unet_keeps_shapes_and_touches_every_conv():
    from tests.model_helpers import tiny_unet, unet_inputs

    unet = tiny_unet("sdxl")
    convs = [m for m in unet.modules() if isinstance(m, nn.Conv2d)]
    sample, t, context, kwargs = unet_inputs(unet, 16, 16, batch=1)
    with torch.no_grad():
        plain = unet(sample, t, context, **kwargs).sample
        with df.dilated_convs(unet, 2):
            assert all(c.dilation == (2, 2) for c in convs)
            dilated = unet(sample, t, context, **kwargs).sample
    assert dilated.shape == plain.shape and not torch.allclose(dilated, plain)
    assert all(c.dilation == (1, 1) for c in convs)


def test_dilation_scale_and_trained_size():
    assert trained_px({"sample_size": 128}, {"block_out_channels": [128, 256, 512, 512]}) == 1024
    assert trained_px({"sample_size": 64}, {"block_out_channels": [1, 2, 3, 4]}) == 512
    assert [df.dilation_scale(w, w, 1024) for w in (1024, 2048, 4096, 3000)] == [1, 2, 4, 3]
    assert denoise_steps(10, 0.32, "demofusion") == 4 and denoise_steps(10, 0.32, "sdedit") == 3


class ConvDenoiser(nn.Module):
    """A stand-in UNet: one 3x3 conv as the noise prediction (the loop's maths, not a model's)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True):
        return (self.conv(x) * 0.1,)


def test_denoise_loop_matches_the_written_out_euler_equations():
    """The whole loop, restated with Euler's sigmas: x_i = x0 + sigma_i noise; skip residual; the
    first pass on latents / sqrt(sigma_i^2 + 1); the dilated pass on the blurred latents, scaled
    with the next sigma (the official pipeline scales it after the first step has advanced the
    scheduler); Euler steps lat + (sigma_{i+1} - sigma_i) eps; mix; mean/std of x0."""
    from diffusers import EulerDiscreteScheduler
    from diffusers.utils.torch_utils import randn_tensor

    from linfusion_cli.pipeline.demofusion_stage import Conditioning, denoise, truncated_timesteps

    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    unet = ConvDenoiser()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 4, 10, 14, generator=g).double()
    noise = randn_tensor(x0.shape, generator=g, dtype=torch.float64)
    settings = DemoFusion(3.0, 1.0, 1.0, 0.8, dilation=3)
    unet.double()
    timesteps = truncated_timesteps(sched, 20, 7, "cpu")
    with torch.no_grad():
        got = denoise(unet, sched, x0, noise, timesteps, Conditioning(None, None, False), 1.0, settings, g)

        sigmas = [float(s) for s in sched.sigmas[13:]]  # the truncated schedule's sigmas, then 0
        w, b = unet.conv.weight, unet.conv.bias
        lat = None
        for i, t in enumerate(timesteps.tolist()):
            c, c1, c2, c3 = ref_weights(t, 1000, 3.0, 1.0, 1.0)
            noised = x0 + noise * sigmas[i]
            lat = noised if lat is None else lat
            lat = lat * (1 - c1) + noised * c1
            eps1 = 0.1 * torch.nn.functional.conv2d(lat / (sigmas[i] ** 2 + 1) ** 0.5, w, b, padding=1)
            blurred = ref_blur(lat, 5, 0.8 * c3)
            blurred = ((blurred - blurred.mean(dim=(2, 3), keepdim=True)) / blurred.std(dim=(2, 3), keepdim=True)
                       * lat.std(dim=(2, 3), keepdim=True) + lat.mean(dim=(2, 3), keepdim=True))
            eps2 = 0.1 * torch.nn.functional.conv2d(blurred / (sigmas[i + 1] ** 2 + 1) ** 0.5, w, b,
                                                    padding=3, dilation=3)
            dt = sigmas[i + 1] - sigmas[i]
            lat = (1 - c2) * (lat + dt * eps1) + c2 * (lat + dt * eps2)
        expected = ((lat - lat.mean(dim=(2, 3), keepdim=True)) / lat.std(dim=(2, 3), keepdim=True)
                    * x0.std(dim=(2, 3), keepdim=True) + x0.mean(dim=(2, 3), keepdim=True))
    assert len(timesteps) == 7
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
