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
  skip back to the device when the block indexes it, so one skip at a time is on the device. Not for use with ControlNet/T2I-Adapter residuals (they are added on the device).
* attn_chunk: sets `chunk_size` on every LinFusion layer (modules with a `chunk_size` attribute).
* offload: accelerate CPU offload through the pipeline, CUDA only (apply_offload).
Undo in the reverse order of application (the handle returned by apply_knobs does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class KnobHandle:
    """Undo callable for apply_knobs; `stats` counts skips parked and brought back (tests, logs)."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self.stats = {"skips_to_cpu": 0, "skips_to_device": 0}

    def add(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def __call__(self) -> None:
        while self._undo:
            self._undo.pop()()


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


def _take(obj, half: int, batch: int, index: int):
    """The index-th half of every tensor in obj whose first dim is the batch."""
    if torch.is_tensor(obj):
        return obj[index * half:(index + 1) * half] if obj.dim() and obj.shape[0] == batch else obj
    if isinstance(obj, dict):
        return {k: _take(v, half, batch, index) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_take(v, half, batch, index) for v in obj)
    return obj


def _split_batch(forward):
    """A UNet forward that runs an even batch as two halves and concatenates the outputs."""
    def split_forward(sample, *args, **kwargs):
        batch = sample.shape[0]
        if batch < 2 or batch % 2:
            return forward(sample, *args, **kwargs)
        half = batch // 2
        outs = [forward(*_take((sample, *args), half, batch, i), **_take(kwargs, half, batch, i))
                for i in (0, 1)]
        if isinstance(outs[0], tuple):
            return (torch.cat([o[0] for o in outs]), *outs[0][1:])
        return type(outs[0])(sample=torch.cat([o.sample for o in outs]))  # UNet2DConditionOutput
    return split_forward


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


def _skips_to_cpu(unet: nn.Module, handle: KnobHandle) -> None:
    """Hooks that park skip tensors on the CPU and bring each up block's back before it runs."""
    state = {"device": None, "fetched": set()}  # ids of the skips brought back this forward
    cpu = torch.device("cpu")

    def to_cpu(t):
        handle.stats["skips_to_cpu"] += 1
        return t.to(cpu)

    def to_device(t):  # counts each skip once, however often a hook reads the lazy tuple
        if id(t) not in state["fetched"]:
            state["fetched"].add(id(t))
            handle.stats["skips_to_device"] += 1
        return t.to(state["device"])

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


def _set_chunk_size(model: nn.Module, chunk: int, handle: KnobHandle) -> None:
    """Set `chunk_size` on every LinFusion layer (any module that has that attribute)."""
    for module in model.modules():
        if hasattr(module, "chunk_size"):
            old = module.chunk_size
            module.chunk_size = chunk
            handle.add(lambda m=module, o=old: setattr(m, "chunk_size", o))


def apply_knobs(unet: nn.Module, vae: nn.Module | None, plan) -> KnobHandle:
    """Apply plan's model-side knobs to unet (and in-place SiLU to vae); call the result to undo."""
    handle = KnobHandle()
    if plan.ff_chunk:
        for module in unet.modules():
            ff = getattr(module, "ff", None)
            if isinstance(ff, nn.Module) and type(ff).__name__ == "FeedForward":
                handle.add(_patch_forward(ff, _chunked(plan.ff_chunk)))
    if plan.attn_chunk:
        _set_chunk_size(unet, plan.attn_chunk, handle)
    if plan.inplace:
        for model in (unet, vae):
            if model is not None:
                _swap_silu(model, handle)
    if plan.skips_on_cpu:
        _skips_to_cpu(unet, handle)
    if plan.cfg_split:
        handle.add(_patch_forward(unet, _split_batch))
    return handle


def apply_offload(pipe, offload: str, device: str | torch.device = "cuda") -> Callable[[], None]:
    """accelerate CPU offload ("model" or "sequential") on CUDA; elsewhere nothing. Returns undo."""
    device = torch.device(device)
    if offload == "none" or device.type != "cuda":
        return lambda: None
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        raise ValueError(f"unknown offload mode {offload!r}: none, model or sequential")
    return pipe.remove_all_hooks
