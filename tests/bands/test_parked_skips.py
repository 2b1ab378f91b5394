"""Parked skips (skips_on_cpu under band_rows) through runtime/staging.py, on the CPU with the
stand-in streams and events: the band-wise UNet still equals diffusers' forward; each skip
crosses to the host once and back once per resnet that reads it (its conv1 halo rows included,
its GroupNorm moments never fetched; the one read right after the full-resolution upsampler
comes back once more, for the shortcut: see bands.unet_forward.upsampled); the pool hands the same buffers to the next forward and
never writes or reads one before the copies it waits on; ControlNet residuals are folded in
before the moments are taken."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from linfusion_cli.bands.rows import Moments
from linfusion_cli.bands.unet_forward import banded_forward
from linfusion_cli.runtime import transfer
from linfusion_cli.runtime.staging import Staging

from ..model_helpers import linfusion_unet, unet_inputs

TOL = 1e-5
H, W, ROWS = 23, 17, 5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def unet():
    return linfusion_unet("sd15")


class Bytes:
    """transfer.observed's observer: bytes per direction."""

    def __init__(self) -> None:
        self.h2d = self.d2h = 0

    def __call__(self, direction: str, n: int, blocking: bool) -> None:
        setattr(self, direction, getattr(self, direction) + n)


def skip_shapes(cfg, h: int, w: int) -> list[tuple[int, int, int, int]]:
    """(level, channels, height, width) of every skip, conv_in's first (from the config: each
    down block's resnets keep their level, a downsampler halves it rounding up)."""
    chans, layers = cfg.block_out_channels, cfg.layers_per_block
    out, level = [(0, chans[0], h, w)], 0
    for i, c in enumerate(chans):
        out += [(level, c, h, w)] * layers
        if i < len(chans) - 1:
            h, w, level = (h + 1) // 2, (w + 1) // 2, level + 1
            out.append((level, c, h, w))
    return out


def window_rows(height: int, rows: int) -> int:
    """Rows a 3x3 conv's pass reads over bands of `rows` rows: each band plus one halo row a
    side inside the map."""
    return sum(min(a + rows + 1, height) - max(a - 1, 0) for a in range(0, height, rows))


def expected_bytes(cfg, batch: int, itemsize: int) -> tuple[int, int]:
    """(d2h, h2d) of one parked forward: every skip out once; back once per consuming resnet
    (the up resnets read one skip each, at its own level), with conv1's halo rows, and the skip
    read right after the full-resolution upsampler (the last one at level 0) once more, without
    a halo: that upsampler's output is not made whole, so its resnet's shortcut reads x again."""
    shapes = skip_shapes(cfg, H, W)
    d2h = sum(batch * c * h * w * itemsize for _, c, h, w in shapes)
    h2d = sum(batch * c * w * itemsize * window_rows(h, -(-ROWS // 2 ** level))
              for level, c, h, w in shapes)
    _, c, h, w = shapes[cfg.layers_per_block]
    return d2h, h2d + batch * c * h * w * itemsize


def test_parked_unet_equals_diffusers_and_each_skip_crosses_once(unet):
    sample, t, context, _ = unet_inputs(unet, H, W)
    counts = Bytes()
    with torch.no_grad():
        reference = unet(sample, t, encoder_hidden_states=context).sample
        with transfer.observed(counts):
            out = banded_forward(unet, ROWS, True, sample, t, context,
                                 staging=Staging(chunk_bytes=1 << 15)).sample
    assert _rel(out, reference) < TOL
    d2h, h2d = expected_bytes(unet.config, 2, 4)
    assert counts.d2h == d2h  # each skip parked once
    # back once per resnet: conv1's band with its halo; moments and the shortcut read nothing
    assert counts.h2d == h2d
    assert h2d < 2 * d2h  # the figure is one pass, not the three of before


def _forwards(log: list) -> list[list]:
    """The log cut at each ("begin",): one list of entries per forward."""
    out = []
    for entry in log:
        if entry == ("begin",):
            out.append([])
        elif out:
            out[-1].append(entry)
    return out


def test_pool_reuses_its_buffers_and_waits_before_each_copy(unet):
    """Two forwards through one Staging: the same chunks (storage pointers), no new host bytes;
    a copy into a reused buffer only after waiting on every copy the last forward made with it;
    a fetch only after waiting on the copies out of the rows it reads; and the next band's
    fetch issued before the current band computes."""
    sample, t, context, _ = unet_inputs(unet, H, W)
    log: list = []
    staging = Staging(chunk_bytes=1 << 15, log=log)  # several blocks per map
    computed = [r.nonlinearity.register_forward_hook(lambda *a: log.append(("compute",)))
                for blk in unet.up_blocks for r in blk.resnets]
    try:
        with torch.no_grad():
            first = banded_forward(unet, ROWS, True, sample, t, context, staging=staging).sample
            chunks = [c.data_ptr() for a in staging._arenas.values() for c in a.chunks]
            size = staging.host_bytes
            second = banded_forward(unet, ROWS, True, sample, t, context, staging=staging).sample
    finally:
        for h in computed:
            h.remove()
    assert torch.equal(first, second)
    assert [c.data_ptr() for a in staging._arenas.values() for c in a.chunks] == chunks
    assert staging.host_bytes == size and size >= expected_bytes(unet.config, 2, 4)[0]
    one, two = _forwards(log)
    keys = lambda entries: {e[1] for e in entries if e[0].startswith("copy")}  # noqa: E731
    assert keys(one) == keys(two) and len(keys(one)) == len(skip_shapes(unet.config, H, W))

    recorded = [e[1] for e in one if e[0] == "record"]
    for i, entry in enumerate(two):
        done = {e[1] for e in two[:i] if e[0] == "wait"}
        if entry[0] == "copy d2h":  # a reused buffer: the last forward's copies of it are done
            mine = [tag for tag in recorded if tag[1] == entry[1]]
            assert mine and set(mine) <= done, entry
    for entries in (one, two):
        for i, entry in enumerate(entries):
            if entry[0] == "copy h2d":  # the rows it reads were copied out, and waited on
                _, key, lo, hi = entry
                outs = {e[1] for e in entries[:i] if e[0] == "record" and e[1][0] == "d2h"
                        and e[1][1] == key and e[1][2] < hi and e[1][3] > lo}
                assert outs and outs <= {e[1] for e in entries[:i] if e[0] == "wait"}, entry

    # conv1's pass: after band k's rows are used, band k + 1's copy starts before band k computes
    ahead = 0
    for i, entry in enumerate(one):
        if entry[0] == "use":
            nxt = next(e for e in one[i + 1:] if e[0] in ("copy h2d", "compute", "use"))
            if nxt[0] == "copy h2d":
                assert nxt[1] == entry[1] and nxt[2] >= entry[2]
                ahead += 1
    windows = sum(-(-h // -(-ROWS // 2 ** lvl)) for lvl, _, h, _ in skip_shapes(unet.config, H, W))
    # all but each skip's last band, and the shortcut pass of the resnet after the last upsampler
    lvl, _, h, _ = skip_shapes(unet.config, H, W)[unet.config.layers_per_block]
    again = -(-h // -(-ROWS // 2 ** lvl)) - 1
    assert ahead == windows - len(skip_shapes(unet.config, H, W)) + again


def test_controlnet_residuals_are_in_the_parked_skips_and_their_moments(unet):
    """Residuals (a banded ControlNet's, parked as it makes them) added as diffusers adds them:
    the parked forward equals diffusers' UNet with the same residuals; each residual comes back
    once, band by band, while its skip is parked (no halo), and nothing else crosses."""
    from diffusers import ControlNetModel

    from linfusion_cli.adapters.controlnet import prepare_controlnet
    from linfusion_cli.bands.controlnet_forward import banded_controlnet_forward

    torch.manual_seed(3)
    net = ControlNetModel.from_unet(type(unet).from_config(unet.config)).eval()
    zero_convs = list(net.controlnet_down_blocks) + [net.controlnet_mid_block]
    for p in (p for m in zero_convs for p in m.parameters()):
        nn.init.normal_(p, std=0.5)  # residuals as large as the skips: the moments must see them
    net = prepare_controlnet(net, unet)
    sample, t, context, _ = unet_inputs(unet, H, W)
    cond = torch.rand(2, 3, H * 8, W * 8)
    counts = Bytes()
    with torch.no_grad():
        down, mid = net(sample, t, context, cond, 0.7, return_dict=False)
        reference = unet(sample, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
        with transfer.observed(counts):
            bdown, bmid = banded_controlnet_forward(net, ROWS, True, sample, t, context, cond, 0.7,
                                                    return_dict=False)
            out = banded_forward(unet, ROWS, True, sample, t, context,
                                 down_block_additional_residuals=bdown,
                                 mid_block_additional_residual=bmid).sample
    assert all(transfer.is_host(r) for r in bdown)
    assert _rel(out, reference) < TOL
    d2h, h2d = expected_bytes(unet.config, 2, 4)
    assert counts.d2h == 2 * d2h  # the residuals parked, then the skips (+ residual) parked
    assert counts.h2d == h2d + d2h  # the skips' windows, and each residual once


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_moments_need_no_float32_copy_of_a_band_and_match_float64(dtype):
    """Moments.add on low-precision bands: sums within 1e-5 of float64's over the same values,
    and never a float32 copy of a whole band (the largest float32 tensor made is a slice)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.f32 = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32:
                self.f32 = max(self.f32, out.numel())
            return out

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 64, 21, 13, generator=g) * 3 + 5).to(dtype)  # a mean well off zero
    m, largest = Moments(), Largest()
    with largest:
        for a in range(0, 21, 8):
            m.add(x[:, :, a:a + 8])
    ref = x.double()
    assert m.count == 21 * 13
    assert _rel(m.sum, ref.sum(dim=(2, 3))) < TOL
    assert _rel(m.sq, (ref * ref).sum(dim=(2, 3))) < TOL
    if dtype != torch.float32:
        assert largest.f32 <= 2 * 8 * 8 * 13  # an eighth of the channels of one band
