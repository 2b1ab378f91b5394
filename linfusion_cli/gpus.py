"""Named GPUs and the time a cost ledger's counts take on them (the planner ranks plans by it).

A phase's predicted time: its kernels, its launches and its asynchronous copies (pinned host
buffers, side streams) overlap, so the longest of the three sets the pace; copies from pageable
memory and host synchronisations block the host and add to it:

    predicted = max(FLOPs / sustained rate, launches x launch overhead, async bytes / pinned bw)
                + blocking bytes / pageable bw + syncs x sync cost
                + bytes sent to peers / link bw + messages x message cost   (band parallelism)

Under band parallelism a rank waits for its peers' halo rows, GroupNorm sums and LinFusion
states before it goes on, so their transfer adds to its time (nothing overlaps them yet).

Figures are datasheet figures (sources beside each) cut to what a real UNet sustains: the
sustained fp16/bf16 rate is HALF the dense tensor-core figure (no GPU run has calibrated it yet:
benchmarks/gpu_16k.py measures it), host bandwidths are ~80% (pinned) and ~40% (pageable) of
the PCIe link's theoretical rate each way, and a launch costs ~6 us of host dispatch in eager
PyTorch. Plain numbers only: no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PlanError

TFLOP = 1e12
GB = 1e9
SUSTAINED_SHARE = 0.5  # of the dense tensor rate, until a GPU run calibrates it
PINNED_SHARE, PAGEABLE_SHARE = 0.8, 0.4  # of the PCIe link's theoretical rate, each way
PCIE_GBPS = {3: 16.0, 4: 32.0, 5: 64.0}  # x16 link, GB/s each way (PCI-SIG, theoretical)
LAUNCH_S = 6e-6  # host dispatch per aten op (PyTorch eager on a recent CPU)
SYNC_S = 30e-6  # a host synchronisation: the queue drains, the host waits, the GPU idles
MESSAGE_S = 25e-6  # one small collective or halo exchange between GPUs (NCCL latency, one node)
LINK_SHARE = 0.8  # of the GPU-to-GPU link's theoretical rate each way


@dataclass(frozen=True)
class Gpu:
    """One GPU model, as the planner prices it."""

    name: str
    memory_gib: float  # what --max-vram defaults to when planning for it without it
    dense_tflops: float  # dense fp16/bf16 tensor rate with fp32 accumulation (datasheet)
    pcie_gen: int  # host link, x16
    bf16: bool  # native bf16 (compute capability >= 8.0)
    nvlink_gbps: float = 0.0  # GPU-to-GPU link each way (datasheet); 0: peers talk over PCIe
    launch_s: float = LAUNCH_S

    @property
    def sustained_flops(self) -> float:
        return self.dense_tflops * TFLOP * SUSTAINED_SHARE

    @property
    def pinned_bps(self) -> float:
        return PCIE_GBPS[self.pcie_gen] * GB * PINNED_SHARE

    @property
    def pageable_bps(self) -> float:
        return PCIE_GBPS[self.pcie_gen] * GB * PAGEABLE_SHARE

    @property
    def link_bps(self) -> float:
        """Bytes per second a rank sends to its peers (NVLink where the GPU has it, else PCIe)."""
        return (self.nvlink_gbps or PCIE_GBPS[self.pcie_gen]) * GB * LINK_SHARE

    def to_dict(self) -> dict:
        return {"name": self.name, "memory_gib": self.memory_gib,
                "sustained_tflops": round(self.sustained_flops / TFLOP, 1),
                "pinned_gbps": round(self.pinned_bps / GB, 1),
                "pageable_gbps": round(self.pageable_bps / GB, 1),
                "link_gbps": round(self.link_bps / GB, 1), "launch_us": self.launch_s * 1e6}


GPUS = {g.name: g for g in (
    # NVIDIA H100 Tensor Core GPU datasheet: SXM 989 TFLOPS bf16/fp16 dense, 80 GB, PCIe Gen5,
    # NVLink 900 GB/s (450 each way)
    Gpu("h100", 80, 989.0, 5, True, nvlink_gbps=450.0),
    # same datasheet, PCIe card: 756 TFLOPS bf16/fp16 dense, 80 GB, PCIe Gen5 (bridges optional:
    # priced without)
    Gpu("h100-pcie", 80, 756.0, 5, True),
    # NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOPS bf16/fp16 dense, 80 GB, PCIe Gen4, SXM
    # NVLink 600 GB/s (300 each way)
    Gpu("a100", 80, 312.0, 4, True, nvlink_gbps=300.0),
    # NVIDIA L40S datasheet: 362 TFLOPS bf16/fp16 dense (733 with sparsity), 48 GB, PCIe Gen4
    Gpu("l40s", 48, 362.0, 4, True),
    # NVIDIA Ada GPU architecture whitepaper, RTX 4090: 165.2 TFLOPS fp16 tensor, fp32 accumulate, 24 GB, PCIe Gen4
    Gpu("rtx4090", 24, 165.2, 4, True),
    # NVIDIA Ampere GA102 GPU architecture whitepaper, RTX 3090: 71 TFLOPS fp16 tensor, fp32 accumulate, 24 GB, PCIe Gen4
    Gpu("rtx3090", 24, 71.0, 4, True),
    # same whitepaper's GA106 figures, RTX 3060 12 GB: 25.6 TFLOPS fp16 tensor, fp32 accumulate, PCIe Gen4
    Gpu("rtx3060", 12, 25.6, 4, True),
    # NVIDIA T4 datasheet: 65 TFLOPS fp16 mixed precision, 16 GB, PCIe Gen3; no bf16 (sm_75)
    Gpu("t4", 16, 65.0, 3, False),
)}


def gpu_named(name: str) -> Gpu:
    """The table's GPU of that name (case and '-'/' ' insensitive), or one clear PlanError."""
    key = name.strip().lower().replace(" ", "").replace("_", "-")
    key = {"h100-sxm": "h100", "rtx-4090": "rtx4090", "rtx-3090": "rtx3090",
           "rtx-3060": "rtx3060"}.get(key, key)
    if key not in GPUS:
        raise PlanError(f"unknown --gpu {name!r}; known: {', '.join(GPUS)}")
    return GPUS[key]


def detected_gpu(device_name: str, memory_gib: float) -> Gpu:
    """The table's entry for a CUDA device's name (torch.cuda.get_device_name), else an entry
    for an unknown GPU priced like the nearest smaller one in memory."""
    lowered = device_name.lower().replace(" ", "")
    for key, gpu in sorted(GPUS.items(), key=lambda kv: -len(kv[0])):
        if key.replace("-", "") in lowered.replace("-", ""):
            return gpu
    near = max((g for g in GPUS.values() if g.memory_gib <= memory_gib + 1),
               key=lambda g: g.memory_gib, default=GPUS["t4"])
    return Gpu(device_name, round(memory_gib, 1), near.dense_tflops, near.pcie_gen, near.bf16,
               near.nvlink_gbps)


@dataclass(frozen=True)
class Seconds:
    """A phase's predicted time and its parts."""

    compute_s: float
    launch_s: float
    async_copy_s: float
    blocking_s: float
    peers_s: float = 0.0  # band parallelism: waiting for the peers' messages

    @property
    def predicted_s(self) -> float:
        return max(self.compute_s, self.launch_s, self.async_copy_s) + self.blocking_s + self.peers_s


def predict(cost, gpu: Gpu) -> Seconds:
    """Seconds a ledger's `cost` (tracing.ledger.Cost, or any object with its fields) takes on gpu."""
    async_bytes = cost.h2d_bytes + cost.d2h_bytes - cost.blocking_bytes
    return Seconds(compute_s=cost.flops / gpu.sustained_flops,
                   launch_s=cost.launches * gpu.launch_s,
                   async_copy_s=async_bytes / gpu.pinned_bps,
                   peers_s=cost.link_bytes / gpu.link_bps + cost.messages * MESSAGE_S,
                   blocking_s=cost.blocking_bytes / gpu.pageable_bps + cost.syncs * SYNC_S)
