"""--preview as planned: which method draws it, where it goes, how often, and per stage its size
and the device bytes it takes, which the planner adds to the stage's estimated peak.

The preview is made from the scheduler's predicted clean latent x0, average-pooled on the device
to a small grid before anything else touches it (pipeline/preview.py), so its cost does not grow
with the stage: at 16384 px and --preview-size 1024, latent2rgb reads a 1024-cell grid and TAESD
decodes a 128-cell one (1024 px), never the stage's whole latent and never the full VAE.
The preview never changes the memory plan: it gets the room the stage's plan leaves under the
budget, and shrinks (halving its size, then TAESD giving way to latent2rgb) when that is short,
so the knobs, and with them the image, are those of the run without a preview.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import PlanError
from ..inputs import expand
from ..io import previews
from ..models import taesd
from ..models.taesd import TaesdInfo

DEFAULT_SIZE = 1024  # px, the preview's long side
PER_STAGE = 10  # without --preview-every: about this many previews per stage
MIN_SIZE = 64  # px: the smallest preview a tight budget shrinks it to
LATENT_SCALE = 8  # px per latent cell (every family's VAE)
TAESD_LIVE_MAPS = 4  # decoder activations alive at once at its output size (conv in, out, skip, sum)


@dataclass(frozen=True)
class StagePreview:
    """One stage's preview: its method, pooled latent grid, image size and device bytes."""

    stage: int
    method: str  # latent2rgb | taesd
    grid: tuple[int, int]  # (w, h) latent cells after pooling
    pool: int  # the average-pooling factor over the stage's latent
    width: int
    height: int
    bytes: int
    every: int  # denoising steps between previews in this stage

    def to_dict(self) -> dict:
        return {"stage": self.stage + 1, "method": self.method, "width": self.width,
                "height": self.height, "pool": self.pool, "every": self.every, "bytes": self.bytes}


@dataclass(frozen=True)
class PreviewPlan:
    path: str  # the file (batch: a template until each entry's path is filled in)
    asked: str  # auto | latent2rgb | taesd
    method: str  # what runs: latent2rgb | taesd
    size: int  # the long side asked for, px
    every: int | None  # --preview-every; None: about PER_STAGE per stage
    taesd: TaesdInfo | None = None
    why: str = ""  # how auto chose, or why a stage's preview was shrunk
    stages: tuple[StagePreview | None, ...] = ()  # per stage, filled in by the memory planner

    def interval(self, denoise_steps: int) -> int:
        return self.every or max(1, math.ceil(denoise_steps / PER_STAGE))

    def to_dict(self) -> dict:
        return {"path": self.path, "method": self.method, "asked": self.asked, "size": self.size,
                "every": self.every, "taesd": self.taesd.to_dict() if self.taesd else None,
                "why": self.why or None,
                "stages": [s.to_dict() if s is not None else None for s in self.stages],
                "bytes": max((s.bytes for s in self.stages if s is not None), default=0)}


OPTION_FLAGS = (("preview_every", "--preview-every"), ("preview_size", "--preview-size"),
                ("preview_method", "--preview-method"), ("preview_taesd", "--preview-taesd"))


def plan_preview(req, *, family: str, model: str, latent_channels: int) -> PreviewPlan | None:
    """The request's preview (None without --preview), checked before any model loads: the
    file's folder and suffix (the file itself once its name is final: cli), the method (auto
    resolved), the TAESD's weights."""
    if req.preview is None:
        given = [flag for name, flag in OPTION_FLAGS if getattr(req, name) is not None]
        if given:
            raise PlanError(f"{given[0]} needs --preview PATH")
        return None
    path = expand(req.preview)
    if previews.is_template(path):
        previews.check_folder(path)
    else:
        previews.check_target(path)
    asked = req.preview_method or "auto"
    if asked == "latent2rgb" and req.preview_taesd is not None:
        raise PlanError("--preview-taesd needs --preview-method taesd or auto")
    size = req.preview_size if req.preview_size is not None else DEFAULT_SIZE
    plan = PreviewPlan(path=path, asked=asked, method="latent2rgb", size=size, every=req.preview_every)
    if asked == "latent2rgb":
        return plan
    source = expand(req.preview_taesd) if req.preview_taesd else taesd.default_source(family, model)
    info = taesd.find(source, family=family, latent_channels=latent_channels,
                      required=asked == "taesd" or req.preview_taesd is not None)
    if info is None:
        return replace(plan, why=f"auto: no TAESD in the local cache ({source}); latent2rgb")
    return replace(plan, method="taesd", taesd=info)


def geometry(method: str, width: int, height: int, size: int) -> tuple[tuple[int, int], int, int, int]:
    """((grid w, grid h), pooling factor, preview width, height) for a stage of width x height."""
    long = max(width, height)
    target = min(size, long)
    lw, lh = -(-width // LATENT_SCALE), -(-height // LATENT_SCALE)
    cells = max(1, target // LATENT_SCALE) if method == "taesd" else target  # grid long side wanted
    pool = max(1, math.ceil(max(lw, lh) / cells))
    grid = (-(-lw // pool), -(-lh // pool))
    return grid, pool, max(1, round(width * target / long)), max(1, round(height * target / long))


def preview_bytes(method: str, grid: tuple[int, int], *, dtype_bytes: int, vae_bytes: int,
                  decoder: TaesdInfo | None = None, channels: int = 4) -> int:
    """Device bytes of one preview: the pooled sample and model output (and x0 in float32), then
    latent2rgb's float32 RGB grid, or TAESD's decoder weights, its activations at its output
    size and the float32 image."""
    cells = grid[0] * grid[1]
    pooled = 2 * channels * cells * dtype_bytes + channels * cells * 4
    if method == "latent2rgb":
        return pooled + 3 * cells * 4
    pixels = cells * LATENT_SCALE ** 2
    return (pooled + decoder.decoder_params * vae_bytes
            + TAESD_LIVE_MAPS * decoder.decoder_width * pixels * vae_bytes + 3 * pixels * 4)


def fit(preview: PreviewPlan, stage, room: int | None, *, dtype_bytes: int,
        vae_bytes: int) -> StagePreview | None:
    """The stage's preview within `room` bytes (None: no limit): the asked size and method, else
    halved sizes, else latent2rgb; None when not even the smallest latent2rgb fits."""
    methods = (preview.method, "latent2rgb") if preview.method == "taesd" else (preview.method,)
    for method in methods:
        size = preview.size
        while True:
            grid, pool, width, height = geometry(method, stage.width, stage.height, size)
            need = preview_bytes(method, grid, dtype_bytes=dtype_bytes, vae_bytes=vae_bytes,
                                 decoder=preview.taesd)
            if room is None or need <= room:
                return StagePreview(stage.index, method, grid, pool, width, height, need,
                                    preview.interval(stage.denoise_steps))
            if size <= MIN_SIZE:
                break
            size = max(MIN_SIZE, size // 2)
    return None


def shrink_note(preview: PreviewPlan, stages) -> str:
    """The dry run's words for stages whose preview the budget made smaller, or dropped."""
    notes = []
    for stage, got in zip(stages, preview.stages):
        if got is None:
            notes.append(f"stage {stage.index + 1}: none (no room under the budget)")
        elif got.method != preview.method or max(got.width, got.height) < min(preview.size, max(stage.width, stage.height)):
            notes.append(f"stage {stage.index + 1}: {got.method} {got.width}x{got.height} (budget)")
    return "; ".join(notes)

