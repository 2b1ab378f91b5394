"""The budget on CUDA, forced on the CPU by standing in for torch.cuda's functions: --max-vram
becomes the allocator's limit, and each stage's record holds the device's memory figures."""

from __future__ import annotations

import torch

from linfusion_cli.pipeline import applied_memory
from linfusion_cli.planning.budget import Budget

from ..model_helpers import CudaProperties

GIB = 2 ** 30
CUDA = torch.device("cuda", 0)


def test_max_vram_caps_the_allocator_at_its_share_of_the_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: CudaProperties(total_memory=80 * GIB))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    applied_memory.cap_allocator(CUDA, Budget.given(20.0, "--max-vram"))
    assert calls == [(0.25, CUDA)]
    applied_memory.cap_allocator(CUDA, Budget.given(100.0, "--max-vram"))  # more than there is: the whole GPU
    applied_memory.cap_allocator(CUDA, Budget(30.0, "the free memory of cuda:0"))  # not asked: no cap
    applied_memory.cap_allocator(torch.device("cpu"), Budget.given(20.0, "--max-vram"))
    assert calls == [(0.25, CUDA), (1.0, CUDA)]


def test_device_memory_holds_both_peaks_and_what_is_outside_pytorch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (50 * GIB, 80 * GIB))  # 30 GiB used
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 26 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 20 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: 28 * GIB)
    assert applied_memory.device_memory(CUDA) == {"allocated_peak_gib": 20.0, "reserved_peak_gib": 28.0,
                                          "outside_torch_gib": 4.0}
    assert applied_memory.device_memory(torch.device("cpu")) is None
