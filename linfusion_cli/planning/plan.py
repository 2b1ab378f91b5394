"""The frozen generation plan: every stage's size, strength, steps and seed, validated up front.

Built from a preset plus flags before any weights load; `--dry-run` prints it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from .. import validate
from ..adapters.specs import AdapterSpecs
from .budget import Budget
from ..errors import PlanError
from ..models.resolve import ModelInfo
from .memory.planner import MemoryPlan
from .method import DemoFusion, denoise_steps
from .preview_plan import PreviewPlan

MULTIPLE = 8  # the VAE scale factor: image sizes must be multiples of it
MAX_SIDE = 32768


@dataclass(frozen=True)
class Stage:
    """One step of the ladder: text-to-image (strength None) or img2img at a doubled size."""

    index: int
    width: int
    height: int
    strength: float | None  # None: the base text-to-image stage
    steps: int  # nominal scheduler steps; img2img runs int(steps * strength) of them
    seed: int
    guidance: float
    scheduler: str
    memory: MemoryPlan | None = None  # filled in by the planner (memory/fit.add_memory_plans)
    method: str | None = None  # img2img stages: "sdedit" or "demofusion" (method.py)
    demofusion: DemoFusion | None = None  # the settings when method is "demofusion"
    controlnets: tuple[str, ...] = ()  # the ControlNets this stage runs (AdapterSpecs fields): the planner's
    cost: dict | None = None  # planning.cost.StageCost.to_dict() of the plan that runs (priced plans)

    @property
    def denoise_steps(self) -> int:
        """Steps actually run (diffusers' img2img convention; DemoFusion rounds up)."""
        return self.steps if self.strength is None else denoise_steps(self.steps, self.strength, self.method)

    def to_dict(self) -> dict:
        """The stage as the dry run's JSON and the record show it (controlnets: the plan's adapters say)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("memory", "controlnets")}
        d["denoise_steps"] = self.denoise_steps
        d["memory"] = self.memory.to_dict() if self.memory is not None else None
        return d


@dataclass(frozen=True)
class GenerationPlan:
    """Everything a run does, decided before any heavy work."""

    prompt: str
    negative: str
    model: str
    family: str
    linfusion: str | None  # weights id/path, "fresh" for new layers, None for no LinFusion
    seed: int
    stages: tuple[Stage, ...]
    dtype: str = "auto"  # UNet/text dtype: fp16 | bf16 | fp32 once planned
    device: str = "auto"  # the device planned for: cuda, cuda:N, mps, cpu once planned
    vae_dtype: str | None = None  # bf16 beside a 16-bit UNet where the device has it, else fp32
    planned_elsewhere: bool = False  # planned for a CUDA GPU this machine does not have
    init_image: str | None = None  # upscale: the ladder starts from this image
    save_stages: bool = False
    vae_tile_px: int | None = None  # forced VAE tile (--vae-tile); None: planned; 0: untiled
    memory_fixed: dict = field(default_factory=dict)  # other knobs a preset forces
    budget: Budget | None = None  # asked for (flag, preset), then what the stages were planned for
    preset: str | None = None  # the preset's name
    family_from: str = ""  # where the model's family was read (models.resolve)
    method_from: str | None = None  # why the img2img method is not the preset's, if it is not
    model_info: ModelInfo | None = field(default=None, compare=False, repr=False)
    adapters: AdapterSpecs = field(default_factory=AdapterSpecs)  # adapters.check_adapters: LoRA, ControlNet, ...
    world_size: int = 1  # processes one image runs over (band parallelism); memory is per rank
    group_timeout_s: float | None = None  # band parallelism: a rank waits this long for a peer
    gpu: str | None = None  # the GPU the plan is priced for (gpus.GPUS name, or a detected one)
    predicted_s: float | None = None  # the whole run on that GPU, from the stages' costs
    preview: PreviewPlan | None = None  # --preview: method, file, size and bytes per stage (preview_plan.py)

    @property
    def width(self) -> int:
        return self.stages[-1].width

    @property
    def height(self) -> int:
        return self.stages[-1].height

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items()
             if k not in ("stages", "model_info", "budget", "world_size", "group_timeout_s", "preview")}
        d["preview"] = self.preview.to_dict() if self.preview is not None else None
        d["budget"] = self.budget.to_dict() if self.budget is not None else None
        if self.world_size > 1:
            d["parallel"] = {"mode": "bands", "world_size": self.world_size,
                             "group_timeout_s": self.group_timeout_s}
        d["adapters"] = self.adapters.to_dict()  # the record's form (no derived configs)
        notes = {"preset": d.pop("preset"), "family_from": d.pop("family_from")}
        method_from = d.pop("method_from")
        d["extras"] = notes | ({"method_from": method_from} if method_from else {})  # the dry run's JSON
        d["width"], d["height"] = self.width, self.height
        d["stages"] = [s.to_dict() for s in self.stages]
        return d

    def with_seed(self, seed: int) -> "GenerationPlan":
        """The same plan from another run seed (stage k: seed + k): a resumed run's recorded one."""
        validate.seed(seed)
        stages = tuple(replace(s, seed=stage_seed(seed, s.index)) for s in self.stages)
        return replace(self, seed=seed, stages=stages)

    def with_memory(self, memory_plans) -> "GenerationPlan":
        """The same plan with one MemoryPlan per stage."""
        stages = tuple(replace(s, memory=m) for s, m in zip(self.stages, memory_plans))
        return replace(self, stages=stages)


def nearest_valid(n: int) -> tuple[int, int]:
    """The multiples of 8 just below and above n."""
    low = max(MULTIPLE, n // MULTIPLE * MULTIPLE)
    return low, low + MULTIPLE


def check_size(width: int, height: int, what: str = "size") -> None:
    """Sizes must be positive multiples of 8 and at most 32768 on a side."""
    for name, n in (("width", width), ("height", height)):
        if n <= 0:
            raise PlanError(f"{what}: {name} must be positive, got {n}")
        if n > MAX_SIDE:
            raise PlanError(f"{what}: {name} {n} is above the maximum of {MAX_SIDE}")
        if n % MULTIPLE:
            low, high = nearest_valid(n)
            raise PlanError(f"{what}: {name} {n} is not a multiple of {MULTIPLE}; "
                            f"nearest valid: {low} or {high}")


def size_from_res(res: int, aspect: str = "1:1") -> tuple[int, int]:
    """Width and height from a long side and an aspect 'W:H' (the short side rounded to 8)."""
    aw, ah = validate.aspect(aspect)
    if aw >= ah:
        return res, max(MULTIPLE, round(res * ah / aw / MULTIPLE) * MULTIPLE)
    return max(MULTIPLE, round(res * aw / ah / MULTIPLE) * MULTIPLE), res


def ladder_sizes(width: int, height: int, native: int) -> list[tuple[int, int]]:
    """Sizes from a base whose short side is near `native` doubling up to exactly (width, height).

    `native` is the short side the model was trained at (SD1.x 512): 16384x8192 starts at
    1024x512, the published recipe; 4096x4096 at 512x512.
    """
    short_side = min(width, height)
    k = max(0, round(math.log2(short_side / native) - 1e-9)) if short_side > native else 0
    sizes = []
    for i in range(k, -1, -1):
        f = 2 ** i
        sizes.append((max(MULTIPLE, round(width / f / MULTIPLE) * MULTIPLE),
                      max(MULTIPLE, round(height / f / MULTIPLE) * MULTIPLE)))
    return sizes


def upscale_sizes(src: tuple[int, int], width: int, height: int) -> list[tuple[int, int]]:
    """Doubling sizes from an existing image up to exactly (width, height), excluding the image."""
    ratio = max(width / src[0], height / src[1])
    if ratio <= 1:
        return [(width, height)]
    k = max(1, math.ceil(math.log2(ratio) - 1e-9))
    return [(max(MULTIPLE, round(width / 2 ** i / MULTIPLE) * MULTIPLE),
             max(MULTIPLE, round(height / 2 ** i / MULTIPLE) * MULTIPLE)) for i in range(k - 1, -1, -1)]


def stage_strengths(strengths: list[float], count: int) -> list[float]:
    """The i-th upscale stage takes the i-th strength; the last one repeats if the ladder is longer."""
    if count and not strengths:
        raise PlanError("the plan has upscale stages but no strengths")
    return [strengths[min(i, len(strengths) - 1)] for i in range(count)]


def stage_seed(seed: int, index: int) -> int:
    """Stage k's seed: seed + k, wrapped to stay in the one seed range (0 .. 2**32-1)."""
    return (seed + index) % (validate.SEED_MAX + 1)


def build_plan(*, prompt: str, width: int, height: int, native: int, strengths: list[float],
               steps: int, guidance: float, seed: int, scheduler: str, model: str, family: str,
               linfusion: str | None, negative: str = "", init_size: tuple[int, int] | None = None,
               **options) -> GenerationPlan:
    """A validated plan: the base (unless upscaling) then img2img stages doubling to the target."""
    check_size(width, height, "target size")
    for s in strengths:
        validate.strength(s)
    validate.steps(steps)
    validate.guidance(guidance)
    validate.seed(seed)
    validate.text(prompt, "the prompt", empty_ok=False)
    validate.text(negative, "the negative prompt")
    validate.scheduler_needs(scheduler)
    if init_size is None:
        sizes = ladder_sizes(width, height, native)
        kinds = [None] + stage_strengths(strengths, len(sizes) - 1)
    else:
        sizes = upscale_sizes(init_size, width, height)
        kinds = stage_strengths(strengths, len(sizes))
    stages = tuple(Stage(i, w, h, st, steps, stage_seed(seed, i), guidance, scheduler)
                   for i, ((w, h), st) in enumerate(zip(sizes, kinds)))
    for stage in stages:
        check_size(stage.width, stage.height, f"stage {stage.index + 1}")
        if stage.denoise_steps < 1:
            raise PlanError(f"stage {stage.index + 1}: {steps} steps x strength {stage.strength} "
                            "runs no denoising step; raise --steps or the strength")
    return GenerationPlan(prompt=prompt, negative=negative, model=model, family=family,
                          linfusion=linfusion, seed=seed, stages=stages, **options)
