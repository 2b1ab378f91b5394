"""Apply a stage's whole memory plan around its run, and report what was in effect."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..runtime.applied import KnobsInEffect
from .controlnet_knobs import controlnet_knobs
from .knobs import KnobHandle, apply_memory_plan, read_knobs


@dataclass(frozen=True)
class PlanInEffect:
    """A stage's memory plan as it went on: the UNet's record (stages hand it to the ControlNet
    residuals) and every knob read back for the run record."""

    unet: KnobsInEffect
    read_back: dict


@contextlib.contextmanager
def memory_plan_applied(model, memory, group=None):
    """Every model-side knob of `memory` on the shared components for one stage, then undone.

    Yields a PlanInEffect: what the apply put on the UNet and the knobs read back
    (pipeline.knobs.read_knobs), so the run record says what ran rather than what was asked.
    ControlNets get the same chunking, in-place and guidance-split knobs
    (pipeline.controlnet_knobs). group: the band-parallel group the UNet computes with (None:
    alone).
    """
    if memory is None:
        yield PlanInEffect(KnobsInEffect(), read_knobs(model.pipe, KnobsInEffect()))
        return
    handle = KnobHandle()  # every undo below runs, even where one fails or an apply does
    try:
        unet = apply_memory_plan(model.pipe, memory, model.device, group)
        handle.add(unet)
        nets = list(model.controlnets.values())
        if nets:
            handle.add(controlnet_knobs(nets, memory, group))
        yield PlanInEffect(unet.in_effect, read_knobs(model.pipe, unet.in_effect))
    finally:
        handle()


GIB = 2 ** 30


def cap_allocator(device: torch.device, budget) -> None:
    """On CUDA, a budget the user gave (--max-vram, a preset's max_vram) becomes the caching
    allocator's limit for this process, so the plan's figure is one the run cannot exceed."""
    if device.type != "cuda" or budget is None or not budget.asked or not budget.gib:
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget.bytes / total), device)


def reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_memory(device: torch.device) -> dict | None:
    """A stage's device memory on CUDA (None elsewhere): the allocator's allocated and reserved
    peaks, and what others hold on the device outside PyTorch's allocator (cuDNN/cuBLAS
    workspaces, NCCL buffers, other processes), read from the driver's free figure now."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    outside = max(0, total - free - torch.cuda.memory_reserved(device))
    return {"allocated_peak_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3),
            "reserved_peak_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 3),
            "outside_torch_gib": round(outside / GIB, 3)}
