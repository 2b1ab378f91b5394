"""Count the device bytes a real UNet forward keeps alive, at any size, without a GPU.

The UNet is built from its config on the meta device (no memory), LinFusion is mounted and the
plan's knobs applied with the same code a run uses; the forward runs on meta inputs under a
dispatch mode that adds every new storage's bytes when an op creates it and subtracts them when
the storage is freed. The peak is what the planner's estimate models: activations on the
device (weights are excluded; skips parked by skips_on_cpu count as host memory). Not in it:
allocator fragmentation, cuDNN workspaces, the CUDA context (the planner's margin).

torch's own MemTracker (torch.distributed._tools.mem_tracker) counts the same way, but it
attributes memory per module and needs a real device for its snapshots; a 40-line mode is
enough for one number and works on meta tensors.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..runtime import skip_parking
from ..attention import apply_linfusion
from ..pipeline.knobs import apply_knobs
from ..vae import attention
from ..figures import DECODER_CONTEXT, ENCODER_CONTEXT
from ..vae.blocks import decoder_whole, encoder_whole
from ..vae.tiles import rank_bands


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages created inside the mode, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.host: set[int] = set()  # storages that stand for host memory (not counted)
        self.now = 0
        self.peak = 0

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata  # one StorageImpl, shared by every view of it
        if key in self.live or key in self.host:
            return
        n = storage.nbytes()
        self.live[key] = n
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        n = self.live.pop(key, None)
        if n is not None:
            self.now -= n

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of t that stands for host memory: created here, never counted."""
        return self.host_buffer(t.shape, t.dtype)

    def host_buffer(self, shape, dtype: torch.dtype, **_) -> torch.Tensor:
        """An empty meta tensor that stands for host memory (a staged buffer): never counted."""
        with torch.utils._python_dispatch._disable_current_modes():
            out = torch.empty(shape, dtype=dtype, device="meta")
        storage = out.untyped_storage()
        self.host.add(storage._cdata)
        weakref.finalize(storage, self.host.discard, storage._cdata)  # its address may be reused
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


@contextmanager
def _host_parking(mode: LiveBytes):
    """skips_on_cpu's park/fetch as host copies and counted device copies, its staged buffers
    as host memory (meta has no host)."""
    park, fetch, buffer = skip_parking.park, skip_parking.fetch, skip_parking.host_buffer
    skip_parking.park = mode.to_host
    skip_parking.fetch = lambda t, device: t.clone()
    skip_parking.host_buffer = mode.host_buffer
    try:
        yield
    finally:
        skip_parking.park, skip_parking.fetch, skip_parking.host_buffer = park, fetch, buffer


def meta_unet(unet_config: dict, *, linfusion: bool, dtype: torch.dtype = torch.float16,
              projection_mid_dim: int | None = None):
    """A diffusers UNet of this config on the meta device, with LinFusion layers when asked."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config).to(dtype).eval()
        if linfusion:
            apply_linfusion(unet, projection_mid_dim=projection_mid_dim)
    return unet


def _inputs(unet, batch: int, latent_h: int, latent_w: int, dtype: torch.dtype):
    """Meta (sample, timestep, context, extra kwargs) for one UNet call."""
    cfg = unet.config
    with torch.device("meta"):
        sample = torch.empty(batch, cfg.in_channels, latent_h, latent_w, dtype=dtype)
        context = torch.empty(batch, 77, cfg.cross_attention_dim, dtype=dtype)
        kwargs = {}
        if cfg.addition_embed_type == "text_time":
            text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, text, dtype=dtype),
                                           "time_ids": torch.empty(batch, 6, dtype=dtype)}
        timestep = torch.tensor(500.0)
    return sample, timestep, context, kwargs


def trace_unet_bytes(unet_config: dict, *, width: int, height: int, knobs, batch: int = 2,
                     linfusion: bool = True, dtype: torch.dtype = torch.float16,
                     unet=None, group=None) -> int:
    """Peak live activation bytes of one UNet forward at (width, height) under `knobs`.

    knobs: a MemoryPlan (its model-side fields are applied with pipeline.knobs.apply_knobs);
    group: a band-parallel group (parallel.traffic.CountingGroup on meta): one rank's forward.
    The inputs (latents, text context) count, as the estimate counts them.
    """
    unet = unet if unet is not None else meta_unet(unet_config, linfusion=linfusion, dtype=dtype)
    undo = apply_knobs(unet, None, knobs, group)
    try:
        mode = LiveBytes()
        with torch.inference_mode(), mode, _host_parking(mode):
            sample, t, context, kwargs = _inputs(unet, batch, -(-height // 8), -(-width // 8), dtype)
            out = unet(sample, t, encoder_hidden_states=context, **kwargs).sample
            del out
        return mode.peak
    finally:
        undo()


def meta_vae(vae_config: dict, dtype: torch.dtype = torch.bfloat16):
    """A diffusers AutoencoderKL of this config on the meta device."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL.from_config(vae_config).to(dtype).eval()


@contextmanager
def _sdpa_output_only():
    """The VAE attention's SDPA as what memory-efficient/flash kernels allocate: the output only
    (meta tensors take torch's math path, whose score matrix a GPU run never holds)."""
    real = attention.F
    fake = type("F", (), {"scaled_dot_product_attention": staticmethod(
        lambda q, k, v, **kw: q.new_empty(*q.shape[:-1], v.shape[-1]))})
    attention.F = fake
    try:
        yield
    finally:
        attention.F = real


def trace_vae_whole_bytes(vae_config: dict, *, width: int, height: int, band_rows: int,
                          token_limit: int, encode: bool = False,
                          dtype: torch.dtype = torch.bfloat16, vae=None, group=None,
                          tile_px: int = 2048) -> int:
    """Peak live bytes of the tiled VAE's whole-latent part (vae/blocks.py decoder_whole or
    encoder_whole) at (width, height) px, band_rows latent rows per band (0: whole maps).
    Its input counts: the latent (decode) or the tiled path's latent-resolution map (encode).
    group (a parallel.traffic.CountingGroup on the meta device): that rank's share, with the
    bands vae/tiled.py cuts along tiles of `tile_px` (received rows and gathers are real here)."""
    vae = vae if vae is not None else meta_vae(vae_config, dtype)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = -(-height // f), -(-width // f)
    comm, rows = None, h
    if group is not None:
        context = ENCODER_CONTEXT if encode else DECODER_CONTEXT
        parts = rank_bands(h, w, max(1, tile_px // f), context, group.size)
        comm = group.split(parts)
        rows = parts[group.rank][1] - parts[group.rank][0]
    mode = LiveBytes()
    with torch.inference_mode(), _sdpa_output_only(), mode:
        if encode:
            held = {"feat": torch.empty(1, max(vae.config.block_out_channels), rows, w,
                                        dtype=dtype, device="meta")}
            out, _ = encoder_whole(vae, held.pop("feat"), token_limit, band_rows, comm)
        else:
            z = torch.empty(1, vae.config.latent_channels, h, w, dtype=dtype, device="meta")
            out, _ = decoder_whole(vae, z, token_limit, band_rows, comm)
        del out
    return mode.peak
