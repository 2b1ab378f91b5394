"""The upscale stages' method: plain SDEdit img2img, or the DemoFusion-style stage of the official
LinFusion SD-XL pipelines; chosen per plan (flag or preset), recorded on every img2img stage.

No torch here: plans are made and printed before anything heavy is imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import PlanError
from ..validate import METHODS


@dataclass(frozen=True)
class DemoFusion:
    """One DemoFusion stage's settings (official defaults 3/1/1 and sigma 1.0)."""

    cosine_scale_1: float = 3.0  # skip residual toward the noised input: c1 = cosine ** this
    cosine_scale_2: float = 1.0  # dilated pass weight: c2 = cosine ** this
    cosine_scale_3: float = 1.0  # Gaussian sigma scale: c3 = 0.99 cosine ** this + 0.01
    gaussian_sigma: float = 1.0  # the Gaussian filter's sigma before c3
    dilation: int = 1  # the stage's conv dilation: ceil(long side / the model's trained size)

    def check(self, where: str = "demofusion") -> None:
        """Scales >= 0 (inf allowed: weight 0), sigma > 0 and finite."""
        for name in ("cosine_scale_1", "cosine_scale_2", "cosine_scale_3"):
            value = getattr(self, name)
            if math.isnan(value) or value < 0:
                raise PlanError(f"{where} {name!r} must be >= 0, got {value}")
        if not (0 < self.gaussian_sigma < math.inf):
            raise PlanError(f"{where} 'gaussian_sigma' must be positive and finite, got {self.gaussian_sigma}")
        if self.dilation < 1:
            raise PlanError(f"{where} 'dilation' must be >= 1, got {self.dilation}")


def check_method(method: str, where: str = "--method") -> str:
    """The method name, or PlanError naming the choices."""
    if method not in METHODS:
        raise PlanError(f"{where}: unknown method {method!r}; use {' or '.join(METHODS)}")
    return method


def denoise_steps(steps: int, strength: float, method: str | None) -> int:
    """Steps an img2img stage runs: diffusers' int(steps x strength) for SDEdit; the official
    DemoFusion pipeline rounds up (ceil)."""
    if method == "demofusion":
        return min(math.ceil(steps * strength), steps)
    return min(int(steps * strength), steps)


def trained_px(unet_config: dict, vae_config: dict) -> int:
    """The image size the UNet was trained at: sample_size x the VAE's scale factor."""
    factor = 2 ** (len(vae_config.get("block_out_channels", (0, 0, 0, 0))) - 1)
    size = unet_config.get("sample_size", 64)
    size = max(size) if isinstance(size, (list, tuple)) else size
    return int(size) * factor


def with_method(plan, method: str, settings: DemoFusion, trained: int):
    """The plan with `method` on every img2img stage (DemoFusion: settings + its dilation)."""
    check_method(method)
    settings.check()
    stages = []
    for s in plan.stages:
        if s.strength is None:
            stages.append(s)
            continue
        demo = None
        if method == "demofusion":
            demo = replace(settings, dilation=max(1, math.ceil(max(s.width, s.height) / trained)))
        stage = replace(s, method=method, demofusion=demo)
        if stage.denoise_steps < 1:
            raise PlanError(f"stage {s.index + 1}: {s.steps} steps x strength {s.strength} "
                            "runs no denoising step; raise --steps or the strength")
        stages.append(stage)
    return replace(plan, stages=tuple(stages))
