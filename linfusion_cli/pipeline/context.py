"""What every stage shares: the context (plan, components, events) and the tiled-VAE calls."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import vae as tiled_vae
from ..planning.budget import vae_device_budget
from ..planning.plan import GenerationPlan, Stage
from .events import EventHandler, PhaseProgress
from .knobs import vae_on_device
from .recovery import Phases


@dataclass
class StageContext:
    """What every stage needs: the plan, the shared components, and where progress goes."""

    plan: GenerationPlan
    model: object  # models.loading.LoadedModel
    on_event: EventHandler
    txt2img: object = None  # diffusers pipelines sharing one set of components
    img2img: object = None
    preview: object = None  # preview.Previewer (--preview), or None
    group: object = None  # parallel.BandGroup: the ranks this image is made over (None: alone)
    vae_reports: dict = field(default_factory=dict)  # stage index -> {"decode"/"encode": vae.TileReport}
    ip_image: object = None  # the IP-Adapter's image, read once per run (adapters/ip_adapter.py)
    controlnet_pipes: dict = field(default_factory=dict)  # (kind, nets) -> diffusers pipeline, per run
    phases: Phases = field(default_factory=Phases)  # the phase running, test faults, rank agreement

    def __post_init__(self):
        from diffusers import AutoPipelineForImage2Image

        self.txt2img = self.model.pipe
        self.img2img = AutoPipelineForImage2Image.from_pipe(self.txt2img)
        self.img2img.set_progress_bar_config(disable=True)


def cpu_generator(seed: int) -> torch.Generator:
    """Noise is drawn on the CPU so a seed gives the same image on every device."""
    return torch.Generator("cpu").manual_seed(seed)


def tile_px(ctx: StageContext, stage: Stage) -> int | None:
    """The stage's planned VAE tile (which honours --vae-tile); unplanned: the forced one."""
    return stage.memory.vae_tile_px if stage.memory is not None else ctx.plan.vae_tile_px


def band_rows(stage: Stage) -> int:
    """The stage's planned band rows for the tiled VAE's whole-latent part (0: whole maps)."""
    return stage.memory.band_rows if stage.memory is not None else 0


def vae_plan(ctx: StageContext, stage: Stage, part: str) -> dict:
    """tiled_vae.decode/encode's memory arguments for the stage's `part` ("decode"/"encode"), as
    the plan decided them: tile, bands, statistics mode and the host budget it was chosen for.
    A stage without a memory plan (library callers) leaves the mode and budget to the tiled VAE."""
    memory = stage.memory
    mode = getattr(memory, f"vae_{part}_mode") if memory is not None else ""  # the part's field
    if mode in tiled_vae.MODES:  # the plan decided the host budget (planning/memory/fit.vae_modes)
        budget = int(memory.vae_host_gib * 2 ** 30)
    else:  # no memory plan: the tiled VAE's own rule (hostmem.vae_park_budget of the free RAM)
        mode, budget = None, None
    device = None
    if memory is not None and ctx.plan.budget is not None and ctx.model.device.type == "cuda":
        device = vae_device_budget(ctx.plan.budget.bytes, memory.estimated_peak_gib)
    return dict(tile_px=tile_px(ctx, stage), band_rows=band_rows(stage), mode=mode,
                host_budget=budget, device_budget=device, on_report=report_to(ctx, stage, part),
                group=ctx.group)  # band parallelism: the tiles shared out among the ranks


def report_to(ctx: StageContext, stage: Stage, part: str):
    """on_report for the VAE's `part` ("decode"/"encode") of a stage: keeps it for the run record."""
    def keep(report: tiled_vae.TileReport) -> None:
        ctx.vae_reports.setdefault(stage.index, {})[part] = report
    return keep


def decode(ctx: StageContext, stage: Stage, latents: torch.Tensor) -> np.ndarray:
    """latents (1, 4, h, w) -> uint8 (8h, 8w, 3), tiled as planned."""
    progress = lambda done, total: ctx.on_event(PhaseProgress(stage.index, "decode", done, total))  # noqa: E731
    ctx.phases.enter("vae_decode")
    vae_on_device(ctx.model.pipe.vae)
    return tiled_vae.decode(ctx.model.pipe.vae, latents.to(ctx.model.vae_dtype), on_tile=progress,
                            **vae_plan(ctx, stage, "decode"))
