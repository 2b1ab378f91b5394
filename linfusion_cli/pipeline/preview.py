"""--preview while a stage denoises: the scheduler's predicted clean latent x0, from a pooled copy,
drawn as RGB (latent2rgb or TAESD) and written atomically every N steps and at the stage's end.

Nothing here changes the image: the scheduler's step is wrapped only to read its inputs (the
sample and the model output), average-pooled on the device to the planned grid under inference
mode; no random generator is drawn from and no tensor of the run is written to. x0 is formed on
the pooled tensors (pooling is linear, so this is the pooled x0), never at the stage's size.
"""

from __future__ import annotations

import contextlib
import functools
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..io import previews as files
from ..errors import WriteError
from .events import EventHandler, PreviewFailed, PreviewWritten

# latent2rgb: the per-family linear maps of ComfyUI's comfy/latent_formats.py (class SD15, which
# SD2.x shares since its VAE is SD1.x's; class SDXL with its latent_rgb_factors_bias), applied as
# ComfyUI's latent_preview.py does: to x0 in the UNet's (scaled) latent space, rgb = x0 . F + b in
# [-1, 1], then (rgb + 1) / 2. Rows: latent channels 0-3; columns: R, G, B.
_SD1 = ((0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177))
LATENT_RGB = {
    "sd15": (_SD1, (0.0, 0.0, 0.0)),
    "sd21": (_SD1, (0.0, 0.0, 0.0)),
    "sdxl": (((0.3651, 0.4232, 0.4341),
              (-0.2533, -0.0042, 0.1068),
              (0.1076, 0.1111, -0.0362),
              (-0.3165, -0.2492, -0.2188)), (0.1084, -0.0175, -0.0011)),
}


def pool(latents: torch.Tensor, factor: int) -> torch.Tensor:
    """(1, C, h, w) -> (1, C, ceil(h/f), ceil(w/f)) float32, mean over each f x f block (the last
    blocks over what the edge leaves); a new tensor, the input untouched."""
    x = latents.detach()
    if factor > 1:
        if x.device.type == "cpu" and x.dtype == torch.float16:  # no half pooling on every CPU build
            x = x.float()
        x = F.avg_pool2d(x, factor, stride=factor, ceil_mode=True)
    return x.float()


def x0_from(scheduler, sample: torch.Tensor, model_output: torch.Tensor, timestep) -> torch.Tensor:
    """The clean latent the scheduler's step predicts from (sample, model output) at `timestep`,
    for the tensors given (pooled ones: the formulas are linear in both). Called after the step:
    a sigma-space scheduler (Euler, LMS: sample = x0 + sigma * noise) has moved its step index on."""
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind == "sample":
        return model_output
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0 and hasattr(scheduler, "sigmas"):
        index = getattr(scheduler, "step_index", None)
        sigma = float(scheduler.sigmas[max(0, (index or 1) - 1)])
        if kind == "v_prediction":
            return model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
        return sample - sigma * model_output
    t = int(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else int(timestep)
    alphas = scheduler.alphas_cumprod
    a = float(alphas[min(max(t, 0), len(alphas) - 1)])
    if kind == "v_prediction":
        return a ** 0.5 * sample - (1 - a) ** 0.5 * model_output
    return (sample - (1 - a) ** 0.5 * model_output) / a ** 0.5


def latent_to_rgb(x0: torch.Tensor, family: str) -> np.ndarray:
    """(1, 4, h, w) latents -> uint8 (h, w, 3) by the family's linear map."""
    factors, bias = LATENT_RGB.get(family, LATENT_RGB["sd15"])
    weights = torch.tensor(factors, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", x0[0].float().cpu(), weights) + torch.tensor(bias)
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()


def taesd_to_rgb(x0: torch.Tensor, decoder) -> np.ndarray:
    """(1, 4, h, w) latents -> uint8 (8h, 8w, 3) by a TAESD decoder (output in [-1, 1])."""
    weight = next(decoder.parameters())
    image = decoder(x0.to(device=weight.device, dtype=weight.dtype))[0]
    return ((image.float() + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8) \
        .permute(1, 2, 0).cpu().numpy()


def fitted(image: np.ndarray, width: int, height: int) -> Image.Image:
    """An RGB array as a (width, height) image: box-filtered down, bilinear up."""
    picture = Image.fromarray(image)
    if picture.size == (width, height):
        return picture
    shrink = width < picture.width or height < picture.height
    return picture.resize((width, height), Image.BOX if shrink else Image.BILINEAR)


def thumbnail(image: np.ndarray, width: int, height: int) -> Image.Image:
    """A finished stage's uint8 (H, W, 3) image at the preview's size without copying it whole:
    every k-th pixel (k keeps at least twice the preview's size), then a box filter."""
    step = max(1, min(image.shape[1] // (2 * width), image.shape[0] // (2 * height)))
    return fitted(np.ascontiguousarray(image[::step, ::step]), width, height)


class Previewer:
    """A run's previews: one file, the planned StagePreview per stage, events on `on_event`."""

    def __init__(self, plan, *, family: str, decoder, on_event: EventHandler):
        self.plan = plan  # planning.preview_plan.PreviewPlan
        self.family = family
        self.decoder = decoder  # TAESD decoder (models.taesd.load_decoder) or None
        self.on_event = on_event
        self.failed = False
        files.start(plan.path)

    def stage(self, stage) -> "StagePreviewer | None":
        planned = self.plan.stages[stage.index] if stage.index < len(self.plan.stages) else None
        if planned is None or self.failed:
            return None
        return StagePreviewer(self, stage, planned)

    def finished(self, stage, image: np.ndarray) -> None:
        """The stage's finished image as the preview (what the next stage starts from)."""
        planned = self.plan.stages[stage.index] if stage.index < len(self.plan.stages) else None
        if planned is None or self.failed:
            return
        start = time.perf_counter()
        self.write(stage, thumbnail(image, planned.width, planned.height), None, "image", start)

    def write(self, stage, picture: Image.Image, step: int | None, method: str, start: float) -> None:
        try:
            files.write(picture, self.plan.path)
        except WriteError as exc:  # the run goes on; previews stop
            self.failed = True
            self.on_event(PreviewFailed(stage.index, str(exc)))
            return
        self.on_event(PreviewWritten(stage.index, step, stage.denoise_steps, self.plan.path, picture.width,
                                     picture.height, method, time.perf_counter() - start))


class StagePreviewer:
    """One stage's previews: captures the pooled x0 at the steps that are due, writes them."""

    def __init__(self, owner: Previewer, stage, planned):
        self.owner, self.stage, self.planned = owner, stage, planned
        self.total = stage.denoise_steps
        self.captured = None  # (pooled x0, seconds spent) of the step running now
        self.want = self._due(1)

    def _due(self, done: int) -> bool:
        return done % self.planned.every == 0 or done == self.total

    def capture(self, scheduler, sample, model_output, timestep) -> None:
        """After a scheduler step: keep its pooled x0 if this step's preview is due (DemoFusion
        steps twice per step: its first, undilated pass is the one kept)."""
        if not self.want or self.captured is not None or self.owner.failed:
            return
        start = time.perf_counter()
        with torch.inference_mode():
            factor = self.planned.pool
            x0 = x0_from(scheduler, pool(sample, factor), pool(model_output, factor), timestep)
        self.captured = (x0, time.perf_counter() - start)

    def step_done(self, step: int) -> None:
        """Denoising step `step` (0-based) has finished: write its preview if one was captured."""
        captured, self.captured = self.captured, None
        self.want = self._due(step + 2)
        if captured is None or self.owner.failed:
            return
        x0, spent = captured
        start = time.perf_counter() - spent
        with torch.inference_mode():
            if self.planned.method == "taesd" and self.owner.decoder is not None:
                rgb, method = taesd_to_rgb(x0, self.owner.decoder), "taesd"
            else:
                rgb, method = latent_to_rgb(x0, self.owner.family), "latent2rgb"
        picture = fitted(rgb, self.planned.width, self.planned.height)
        self.owner.write(self.stage, picture, step + 1, method, start)


class _Idle:
    """The stage's watch when there is no preview."""

    def step_done(self, step: int) -> None:
        pass


@contextlib.contextmanager
def watching(previewer: Previewer | None, stage, scheduler):
    """While the block runs, `scheduler.step` also hands its tensors to the stage's previews
    (same signature, same result); yields the object whose step_done(i) the step callback calls."""
    watch = previewer.stage(stage) if previewer is not None else None
    if watch is None:
        yield _Idle()
        return
    original = scheduler.step

    @functools.wraps(original)  # the pipelines read its signature (eta, generator)
    def step(model_output, timestep, sample, *args, **kwargs):
        out = original(model_output, timestep, sample, *args, **kwargs)
        watch.capture(scheduler, sample, model_output, timestep)
        return out

    scheduler.step = step
    try:
        yield watch
    finally:
        del scheduler.step  # the class's method again
