"""Figures shared by the code and the memory planner's estimate of it, kept in one place.

Each value here changes what the code allocates; the planner reads the same value, so the
estimate it prints cannot drift from the run. Plain numbers only: no torch import.
"""

from __future__ import annotations

# Tiled VAE (linfusion_cli.vae): context around each tile, in latent px (x8 image px).
DECODER_CONTEXT = 11
ENCODER_CONTEXT = 6
# Long side, latent px, of the downscaled pass that records GroupNorm stats in "estimated" mode.
STATS_PX = 128
# VAE mid-block attention runs exactly (globally) up to this many latent tokens, windowed beyond.
VAE_ATTN_TOKEN_LIMIT = {"cuda": 1024 * 1024, "cpu": 128 * 128}
# Beyond it, windows of this many latent px a side whose cores overlap by ATTENTION_OVERLAP.
ATTENTION_WINDOW = 128
ATTENTION_OVERLAP = 32
# Its SDPA: a fused CUDA kernel (flash / memory-efficient, no N x N scores) takes every query in
# one call; otherwise (the CPU's math path) queries go in chunks whose fp32 scores stay under this.
VAE_ATTN_SCORE_BYTES = {"cuda": 2 << 30, "cpu": 256 << 20}
# Exact mode's paused tiles may hold this share of the GPU memory free when the tiled pass starts,
# when no device budget is given (the running tile needs the rest); beyond, they park in host RAM.
VAE_DEVICE_PARK_SHARE = 0.5
# VAE tile size on the CPU: big tiles buy a GPU fewer launches, a CPU nothing but memory use.
CPU_VAE_TILE = 1024

# LinFusion layer: tokens per chunk when no chunk is set. A CPU is 1.7x faster with cache-sized
# chunks (8192, measured at 64K tokens); a GPU prefers large kernels.
LINFUSION_DEFAULT_CHUNK = {"cuda": 1 << 16, "cpu": 8192}


def device_kind(device) -> str:
    """'cuda' for CUDA devices, else 'cpu' (mps and others use the CPU figures)."""
    kind = getattr(device, "type", str(device).split(":")[0])
    return "cuda" if kind == "cuda" else "cpu"
