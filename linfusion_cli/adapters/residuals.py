"""ControlNet residuals made per UNet forward and added to the skips in place (same image, less memory).

diffusers' ControlNet pipelines call `controlnet(...)` on the whole guidance batch, then
`unet(..., down_block_additional_residuals=R, mid_block_additional_residual=m)`: the residuals of
both CFG halves stay alive through the UNet's forward, which adds them to its skips as new
tensors (old skips, residuals and sums alive at once) and keeps the sums referenced to its end.

Here the pipeline's ControlNet call only records its arguments (Deferred). The UNet, wrapped
outermost (outside the CFG split), takes the Deferred out of its keyword arguments; hooks then,
for each UNet forward (one per CFG half under cfg_split), run the ControlNet on that forward's
batch rows just before the UNet's conv_in, collect the skips as conv_in and the down blocks return
them, and after the middle block add each residual to its skip in place (the values diffusers'
`skip + residual` gives: the same elementwise add), add the middle residual to the middle block's
output (as diffusers does) and drop the residuals. With skips_on_cpu (pipeline/knobs.py parks the
skips on the host) the residuals are parked as the ControlNet returns them and each is added to
its skip's device copy when the up block brings that skip back (a call registered on the
applied knobs' `skip_fetch`, runtime/applied.py: the UNet's knobs are an argument). The images
are bit-identical (tests/adapters/test_controlnet.py); the step's peak has one half's residuals,
during the down path only (none with skips_on_cpu), and no second set of skips
(planning/memory/adapter_estimate.py, checked by tracing/adapters.py).
"""

from __future__ import annotations

from torch import nn

from ..runtime import skip_parking  # skip_parking.* is swapped by the memory trace: looked up per call
from ..runtime import transfer
from ..runtime.applied import KnobsInEffect
from ..runtime.batching import batch_rows

ENABLED = True  # tests switch it off to compare with diffusers' own order


class Deferred:
    """The pipeline's ControlNet call, not yet run: (forward, args, kwargs, batch)."""

    def __init__(self, forward, args, kwargs, batch: int):
        self.forward, self.args, self.kwargs, self.batch = forward, args, kwargs, batch

    def run(self, start: int, stop: int):
        """(down residuals, mid residual) for batch rows start:stop."""
        rows = lambda obj: batch_rows(obj, start, stop, self.batch)  # noqa: E731
        return self.forward(*rows(self.args), **rows(self.kwargs))


def residuals_in_place(control: nn.Module, unet: nn.Module, knobs: KnobsInEffect):
    """Defer `control`'s forward (a ControlNetModel or MultiControlNetModel, as the pipeline calls
    it) and run it inside each UNet forward, residuals added in place; `knobs`: what the memory
    plan put on the UNet (pipeline/knobs.py's handle). Returns the undo."""
    state: dict = {"deferred": None, "offset": 0, "down": None, "mid": None, "skips": [],
                   "pairs": {}}
    banded = knobs.bands is not None  # bands/unet_forward.py calls `control` itself
    parked = knobs.skips_on_cpu
    inner_control = control.forward

    def deferred_forward(sample, *args, **kwargs):
        marker = Deferred(inner_control, (sample, *args), kwargs, sample.shape[0])
        return marker, marker  # (down_block_res_samples, mid_block_res_sample) for the pipeline

    inner_unet = unet.forward

    def unet_forward(*args, **kwargs):
        down = kwargs.get("down_block_additional_residuals")
        if not isinstance(down, Deferred):
            return inner_unet(*args, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in (
            "down_block_additional_residuals", "mid_block_additional_residual")}
        state.update(deferred=down, offset=0)
        if banded:
            kwargs["control"] = take_rows
        try:
            return inner_unet(*args, **kwargs)
        finally:
            state.update(deferred=None, down=None, mid=None, skips=[], pairs={})

    def take_rows(batch: int):  # the next `batch` rows of the guidance batch: run the ControlNet
        start = state["offset"]
        state["offset"] = stop = start + batch
        down, mid = state["deferred"].run(start, stop)
        down = list(down)
        if parked:  # one by one, so each device residual is freed as its host copy is made
            for i, residual in enumerate(down):
                if not transfer.is_host(residual):  # a banded ControlNet parked its own
                    down[i] = skip_parking.park(residual)
            del residual
        return down, mid

    def before_conv_in(module, args):  # this forward's rows of the batch: run the ControlNet
        if state["deferred"] is None:
            return None
        down, mid = take_rows(args[0].shape[0])
        state.update(down=down, mid=mid, skips=[], pairs={})
        return None

    def after_conv_in(module, args, output):
        if state["down"] is not None:
            state["skips"].append(output)

    def after_down_block(module, args, output):
        if state["down"] is not None:
            state["skips"].extend(output[1])

    def after_mid_block(module, args, output):
        if state["down"] is None:
            return None
        if parked:  # host skips: each residual is added to its skip's device copy (on_skip_fetch)
            state["pairs"] = {id(s): r for s, r in zip(state["skips"], state["down"], strict=True)}
        else:
            for skip, residual in zip(state["skips"], state["down"], strict=True):
                skip.add_(residual)  # the middle block has read the last skip: in place is safe
            state["skips"] = []
        output = output + state["mid"]
        state.update(down=None, mid=None)
        return output

    def on_skip_fetch(host, out):  # a parked skip back on the device: its residual added
        residual = state["pairs"].get(id(host))
        if residual is None:
            return out
        residual = skip_parking.fetch(residual, out.device)
        return out.add_(residual) if out.data_ptr() != host.data_ptr() else out + residual

    control.forward = deferred_forward
    unet.forward = unet_forward
    unregister = knobs.skip_fetch.register(on_skip_fetch) if knobs.skip_fetch is not None else None
    hooks = []
    if not banded:  # the band-wise forward adds the residuals to its skips itself
        hooks = [unet.conv_in.register_forward_pre_hook(before_conv_in),
                 unet.conv_in.register_forward_hook(after_conv_in),
                 unet.mid_block.register_forward_hook(after_mid_block)]
        hooks += [b.register_forward_hook(after_down_block) for b in unet.down_blocks]

    def undo():
        for h in hooks:
            h.remove()
        if unregister is not None:
            unregister()
        for module, previous in ((unet, inner_unet), (control, inner_control)):
            if getattr(previous, "__self__", None) is module and previous.__func__ is type(module).forward:
                module.__dict__.pop("forward", None)  # it was the class's own forward
            else:
                module.forward = previous
    return undo
