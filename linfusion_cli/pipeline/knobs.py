"""Apply a MemoryPlan's model-side knobs to loaded diffusers components, and take them off again.

Every knob leaves the output unchanged (bit-for-bit in fp32 on the CPU, up to kernel rounding on
GPUs); they trade speed for peak memory:

* ff_chunk: each transformer FeedForward runs on `ff_chunk` tokens at a time (it is token-wise,
  so the result is the same); its (B, N, 8C) GEGLU intermediate shrinks to (B, chunk, 8C).
  diffusers' own `set_chunk_feed_forward` needs N divisible by the chunk; ours takes any N.
* cfg_split: the UNet runs a batch of 2 (uncond + cond) as two batches of 1, halving every
  activation; the UNet is per-sample (GroupNorm, attention), so results match.
* inplace: SiLU on spatial tensors (ndim > 2) runs in place. Only while autograd is off
  (no_grad / inference_mode), and never on the 2-D time embedding, which ResnetBlock2D shares
  across blocks (`temb = nonlinearity(temb)` in place would corrupt every later block). GELU/GEGLU
  have no in-place form in PyTorch, so the feed-forward is left alone (ff_chunk covers it).
* skips_on_cpu: the UNet skip tensors (conv_in output and every down-block residual) are moved
  to the CPU as they are produced; a pre-hook on each up block hands it a tuple that copies a
  skip back to the device when the block indexes it, so one skip at a time is on the device.
  ControlNet residuals are parked too and added as each skip comes back
  (adapters/residuals.py registers that on the record's `skip_fetch`).
* band_rows: the UNet's forward runs band by band (linfusion_cli/bands): every layer holds its
  input, its output and one band of `band_rows` latent rows (halved per level); skips_on_cpu
  is then done by the band-wise forward itself, whose skips come back one band at a time.
* attn_chunk: sets `chunk_size` on every LinFusion layer (modules with a `chunk_size` attribute).
* offload: accelerate CPU offload of the text encoders and UNet (model or per layer) and of
  the VAE (whole), see _offload.
Undo in the reverse order of application (the handle returned by apply_knobs does). What went on
is in the handle's `in_effect` (runtime/applied.py), filled here as each knob is applied; nothing is
set on modules or functions to say so.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models.loading import OFFLOADABLE
from ..runtime import skip_parking
from ..runtime.applied import Bands, KnobsInEffect, SkipFetch
from ..runtime.batching import join_unet_outputs, split_batch
from ..runtime.staging import Staging
from ..bands import controlnet_forward as banded_controlnet, unet_forward as banded_unet


class KnobHandle:
    """Undo callable for apply_knobs; `in_effect`: what it applied (runtime/applied.py); `stats`
    counts skips parked and brought back (tests, logs)."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self.stats = {"skips_to_cpu": 0, "skips_to_device": 0}
        self.in_effect = KnobsInEffect()  # nothing yet

    def add(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def __call__(self) -> None:
        """Every undo, last first, even where one fails (a patch left on a module would stay for
        the retry and every later batch entry); then the first failure, the others noted on it."""
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as exc:  # noqa: BLE001 - collected, raised below
                errors.append(exc)
        if errors:
            for other in errors[1:]:
                errors[0].add_note(f"another undo failed too: {type(other).__name__}: {other}")
            raise errors[0]


class SpatialInplaceSiLU(nn.SiLU):
    """SiLU that overwrites its input when it is a fresh spatial activation and autograd is off."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inplace = x.dim() > 2 and not torch.is_grad_enabled()
        return F.silu(x, inplace=inplace)


def _patch_forward(module: nn.Module, wrapper) -> Callable[[], None]:
    """Replace module.forward with wrapper(previous forward); return the undo."""
    had = "forward" in module.__dict__
    previous = module.forward
    module.forward = wrapper(previous)

    def undo():
        if had:
            module.forward = previous
        else:
            del module.forward
    return undo


def _chunked(chunk: int):
    """A FeedForward forward that runs `chunk` tokens (dim 1 of (B, N, C)) at a time."""
    def wrap(forward):
        def chunked_forward(hidden_states, *args, **kwargs):
            if hidden_states.dim() != 3 or hidden_states.shape[1] <= chunk:
                return forward(hidden_states, *args, **kwargs)
            parts = [forward(h, *args, **kwargs) for h in hidden_states.split(chunk, dim=1)]
            return torch.cat(parts, dim=1)  # (B, N, C)
        return chunked_forward
    return wrap


def _swap_silu(model: nn.Module, handle: KnobHandle) -> None:
    """Replace every plain nn.SiLU child of model by SpatialInplaceSiLU."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.SiLU:
                setattr(parent, name, SpatialInplaceSiLU())
                handle.add(lambda p=parent, n=name, c=child: setattr(p, n, c))


class _FetchOnIndex(tuple):
    """A tuple of CPU skips whose items are copied to the device when indexed (slices stay lazy).

    The up blocks take `res_hidden_states_tuple[-1]` and continue with `[:-1]`, so only the skip
    being consumed is on the device, not the whole block's (the hook's kwargs keep the tuple
    alive for the whole block, so a tuple of device copies would hold every skip until it ends).
    """

    def __new__(cls, items, fetch):
        obj = super().__new__(cls, items)
        obj._fetch = fetch
        return obj

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _FetchOnIndex(tuple.__getitem__(self, index), self._fetch)
        return self._fetch(tuple.__getitem__(self, index))

    def __iter__(self):
        return (self._fetch(t) for t in tuple.__iter__(self))


def _skips_to_cpu(unet: nn.Module, handle: KnobHandle) -> SkipFetch:
    """Hooks that park skip tensors on the CPU and bring each up block's back before it runs;
    returns the calls each fetched skip goes through (ControlNet residuals register there)."""
    state = {"device": None, "fetched": set()}  # ids of the skips brought back this forward
    fetched = SkipFetch()
    def to_cpu(t):
        handle.stats["skips_to_cpu"] += 1
        return skip_parking.park(t)

    def to_device(t):  # counts each skip once, however often a hook reads the lazy tuple
        if id(t) not in state["fetched"]:
            state["fetched"].add(id(t))
            handle.stats["skips_to_device"] += 1
        return fetched(t, skip_parking.fetch(t, state["device"]))

    def conv_in_hook(module, args, output):  # the first skip: conv_in's output (B, C0, h, w)
        state["device"] = output.device
        state["fetched"].clear()
        return to_cpu(output)

    def first_down_pre(module, args, kwargs):  # down_blocks[0] computes on the device copy
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"].to(state["device"])}
        else:
            args = (args[0].to(state["device"]), *args[1:])
        return args, kwargs

    def down_hook(module, args, kwargs, output):  # (sample, res_samples): park res_samples
        sample, res = output
        return sample, tuple(to_cpu(t) for t in res)

    def up_pre(module, args, kwargs):  # res_hidden_states_tuple is always passed by keyword
        if "res_hidden_states_tuple" in kwargs:  # each skip comes back as the block takes it
            res = _FetchOnIndex(kwargs["res_hidden_states_tuple"], to_device)
            kwargs = {**kwargs, "res_hidden_states_tuple": res}
        return args, kwargs

    hooks = [unet.conv_in.register_forward_hook(conv_in_hook),
             unet.down_blocks[0].register_forward_pre_hook(first_down_pre, with_kwargs=True)]
    hooks += [b.register_forward_hook(down_hook, with_kwargs=True) for b in unet.down_blocks]
    hooks += [b.register_forward_pre_hook(up_pre, with_kwargs=True) for b in unet.up_blocks]
    for h in hooks:
        handle.add(h.remove)
    return fetched


def _banded(model: nn.Module, bands: Bands, handle: KnobHandle) -> None:
    """model.forward replaced by the band-wise forward (linfusion_cli/bands) of a UNet or a
    ControlNet (whose residuals are parked as they are made when the record's park_skips), over
    its group's ranks when there is one (parallel.BandGroup). Parked maps go into host buffers
    (runtime/staging.py) that live as long as this apply: a UNet's skips reuse theirs every
    forward; a ControlNet's residuals, which leave its forward, get fresh ones."""
    controlnet = hasattr(model, "controlnet_down_blocks")
    if controlnet:
        banded_controlnet.check_controlnet(model)
        forward = banded_controlnet.banded_controlnet_forward
    else:
        banded_unet.check_unet(model)
        forward = banded_unet.banded_forward
    staging = Staging(pooled=not controlnet)

    def wrap(previous):
        def banded(*args, **kwargs):
            return forward(model, bands.rows, bands.park_skips, *args, group=bands.group,
                           staging=staging, **kwargs)
        return banded
    handle.add(_patch_forward(model, wrap))


def _set_chunk_size(model: nn.Module, chunk: int, handle: KnobHandle) -> None:
    """Set `chunk_size` on every LinFusion layer (any module that has that attribute)."""
    for module in model.modules():
        if hasattr(module, "chunk_size"):
            old = module.chunk_size
            module.chunk_size = chunk
            handle.add(lambda m=module, o=old: setattr(m, "chunk_size", o))


OFFLOAD_ORDER = OFFLOADABLE  # run order


def _offload(pipe, mode: str, device: torch.device, handle: KnobHandle) -> None:
    """accelerate CPU offload of the pipeline's models, undone by the handle.

    "model": each model moves to the device when its forward starts and the one before it in
    the chain goes back to the CPU (accelerate's cpu_offload_with_hook). "sequential": every
    layer's weights arrive just before it runs (accelerate's cpu_offload). The VAE is always
    moved whole: the tiled VAE reads its GroupNorm weights directly (vae/norm.py), which
    per-layer hooks would leave on the meta device; stages call `vae_on_device` first.
    diffusers' enable_*_cpu_offload would do the same for whole pipelines, but it offloads to
    CUDA only and also hooks the VAE per layer.
    """
    from accelerate import cpu_offload, cpu_offload_with_hook
    from accelerate.hooks import remove_hook_from_module

    chain = [m for m in (getattr(pipe, n, None) for n in OFFLOAD_ORDER) if isinstance(m, nn.Module)]
    homes = [_home(m, device) for m in chain]  # where each is before the plan

    def undo():  # each model back where it was before this plan (not all onto the device)
        for module, home in zip(chain, homes):
            remove_hook_from_module(module, recurse=True)
            module.to(home)
    handle.add(undo)  # before the hooks go on: a failure half way is undone too
    previous = None
    for module in chain:
        module.to("cpu")
        if mode == "sequential" and module is not pipe.vae:
            cpu_offload(module, execution_device=device)
        else:
            _, previous = cpu_offload_with_hook(module, execution_device=device,
                                                prev_module_hook=previous)


def vae_on_device(vae: nn.Module) -> None:
    """Under model offload, bring the VAE to the device (and the UNet back to the CPU) before the
    tiled VAE calls its submodules directly, which accelerate's forward hook would not see."""
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None and hasattr(hook, "prev_module_hook"):  # accelerate's CpuOffload
        hook.pre_forward(vae)


def apply_knobs(unet: nn.Module, vae: nn.Module | None, plan, group=None) -> KnobHandle:
    """Apply plan's module-level knobs to unet (and in-place SiLU to vae); call the result to undo.
    group: the band-parallel group (parallel.BandGroup) the UNet computes with: always band-wise."""
    handle = KnobHandle()
    try:
        handle.in_effect = _apply_knobs(unet, vae, plan, handle, group)
    except BaseException:
        handle()  # a knob that could not go on: the ones before it come off again
        raise
    return handle


def _apply_knobs(unet: nn.Module, vae: nn.Module | None, plan, handle: KnobHandle,
                 group) -> KnobsInEffect:
    """Each knob on; the record of what went on, as it went on."""
    ff_chunk = 0
    if plan.ff_chunk:
        for module in unet.modules():
            ff = getattr(module, "ff", None)  # transformer blocks have one, other modules not
            if isinstance(ff, nn.Module) and type(ff).__name__ == "FeedForward":
                handle.add(_patch_forward(ff, _chunked(plan.ff_chunk)))
                ff_chunk = plan.ff_chunk
    if plan.attn_chunk:
        _set_chunk_size(unet, plan.attn_chunk, handle)
    if plan.inplace:
        for model in (unet, vae):
            if model is not None:
                _swap_silu(model, handle)
    bands = skip_fetch = None
    if plan.band_rows or group is not None:  # one image over several processes: always band-wise
        bands = Bands(plan.band_rows or None, plan.skips_on_cpu, group)  # None: a band per level
        _banded(unet, bands, handle)
    elif plan.skips_on_cpu:
        skip_fetch = _skips_to_cpu(unet, handle)
    if plan.cfg_split:
        handle.add(_patch_forward(unet, lambda forward: split_batch(forward, join_unet_outputs)))
    return KnobsInEffect(ff_chunk=ff_chunk, cfg_split=bool(plan.cfg_split), bands=bands,
                         skip_fetch=skip_fetch)


def apply_memory_plan(pipe, plan, device: str | torch.device, group=None) -> KnobHandle:
    """Apply every model-side field of a MemoryPlan to a pipeline; call the result to undo (its
    `in_effect`: what went on the UNet).

    The VAE tile size is the one field not set on a module: stages pass it to the tiled VAE.
    """
    if plan.offload not in ("none", "model", "sequential"):
        raise ValueError(f"unknown offload mode {plan.offload!r}: none, model or sequential")
    handle = apply_knobs(pipe.unet, pipe.vae, plan, group)
    try:
        if plan.offload != "none":
            _offload(pipe, plan.offload, torch.device(device), handle)
        else:
            _on_device(pipe, torch.device(device), handle)
    except BaseException:
        handle()
        raise
    return handle


def _home(module: nn.Module, device: torch.device) -> torch.device:
    """Where a model's weights are now (an empty model: `device`)."""
    return next(module.parameters(), torch.empty(0, device=device)).device


def _on_device(pipe, device: torch.device, handle: KnobHandle) -> None:
    """A plan without offload: models left in host memory at load (every plan then offloaded
    them, models.loading's on_host) come to the device for the stage and go back after it."""
    models = [m for m in (getattr(pipe, n, None) for n in OFFLOAD_ORDER) if isinstance(m, nn.Module)]
    away = [(m, _home(m, device)) for m in models if not _on(m, device)]

    def undo():
        for module, home in away:
            module.to(home)
    handle.add(undo)
    for module, _ in away:
        module.to(device)


def _on(module: nn.Module, device: torch.device) -> bool:
    at = _home(module, device)
    return at.type == device.type and (device.index is None or at.index == device.index)


def read_knobs(pipe, in_effect: KnobsInEffect) -> dict:
    """The knobs in effect on a pipeline now: offload, attention chunks and in-place SiLU read
    from its modules (they are module state), the others from the record of what was applied."""
    from accelerate.hooks import AlignDevicesHook, CpuOffload

    unet = pipe.unet
    hooks = [getattr(m, "_hf_hook", None) for m in unet.modules()]  # accelerate's, where offloaded
    if isinstance(getattr(unet, "_hf_hook", None), CpuOffload):
        offload = "model"
    elif any(isinstance(h, AlignDevicesHook) and h.offload for h in hooks if h is not None):
        offload = "sequential"
    else:
        offload = "none"
    chunks = {m.chunk_size for m in unet.modules() if hasattr(m, "chunk_size")}
    silu = [m for model in (unet, pipe.vae) for m in model.modules() if isinstance(m, nn.SiLU)]
    return {"offload": offload, "ff_chunk": in_effect.ff_chunk, "cfg_split": in_effect.cfg_split,
            "attn_chunk": chunks.pop() if len(chunks) == 1 else (sorted(chunks) if chunks else 0),
            "inplace": bool(silu) and all(isinstance(m, SpatialInplaceSiLU) for m in silu),
            "skips_on_cpu": in_effect.skips_on_cpu, "band_rows": in_effect.band_rows}
