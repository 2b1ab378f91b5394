"""The options generate, upscale and batch share: declared once, as one dataclass.

No `from __future__ import annotations` here: Typer reads these annotations as objects when
`shared_options` splices the dataclass's fields into a command's signature.
"""

import functools
import inspect
from dataclasses import dataclass, fields
from typing import Annotated, Optional

import typer
from .. import validate
from ..errors import InputError
from ..planning.method import METHODS
from ..planning.presets import SCHEDULERS
from ..planning.request import Request
from ..validate import strengths_text

Res = Annotated[Optional[int], typer.Option("--res", help="Long side of the final image in px (default 4096); with --aspect.")]
Aspect = Annotated[Optional[str], typer.Option("--aspect", help="Aspect W:H with --res (default: the preset's, 1:1).")]
Width = Annotated[Optional[int], typer.Option("--width", help="Exact final width in px, with --height, instead of --res/--aspect.")]
Height = Annotated[Optional[int], typer.Option("--height", help="Exact final height in px, with --width.")]
Model = Annotated[Optional[str], typer.Option("--model", help="Hub id, local diffusers folder, single .safetensors file (.ckpt only with --allow-pickle; --config DIR gives it its configs offline), or demo, demo-sd21, demo-sdxl (tiny random models, no download).")]
Linfusion = Annotated[Optional[str], typer.Option("--linfusion", help="LinFusion weights: hub id or folder (default: matched to the model: known ids, else by UNet architecture).")]
NoLinfusion = Annotated[bool, typer.Option("--no-linfusion", help="Keep the UNet's own quadratic attention.")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="sd15, sd15-lowmem, sd21, sdxl, sdxl-lowmem, or a user preset name or YAML file (default: the model family's: sd15, sd21 or sdxl).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Run seed 0 .. 4294967295 (-1: random); stage k uses seed + k (default: random).")]
Steps = Annotated[Optional[int], typer.Option("--steps", help="Nominal steps per stage; img2img runs steps x strength.")]
Guidance = Annotated[Optional[float], typer.Option("--guidance", help="Classifier-free guidance scale.")]
Negative = Annotated[Optional[str], typer.Option("--negative", help="Negative prompt.")]
Strengths = Annotated[Optional[str], typer.Option("--strengths", help="img2img strength per x2 stage, e.g. 0.4,0.3,0.2,0.1 (the last repeats).")]
Scheduler = Annotated[Optional[str], typer.Option("--scheduler", help="Sampler: default, ddim, euler, euler_a, dpm++, pndm, lms (lms needs scipy).")]
Method = Annotated[Optional[str], typer.Option("--method", help="How the x2 stages denoise: sdedit (plain img2img) or demofusion (skip residual + dilated pass); default: the preset's (demofusion for the sdxl presets).")]
MaxVram = Annotated[Optional[float], typer.Option("--max-vram", help="Memory budget in GiB (default: the GPU's free memory); without a GPU here, --dry-run --max-vram N plans for an N GiB CUDA GPU.")]
VaeTile = Annotated[Optional[int], typer.Option("--vae-tile", help="VAE tile size in px, 0 = untiled (default: planned); the planner plans the rest around it.")]
SaveStages = Annotated[bool, typer.Option("--save-stages", help="Also keep every intermediate stage image beside the output (NAME.stageK-WxH.png).")]
Output = Annotated[Optional[str], typer.Option("-o", "--output", help="Output file, folder (the name is made from the prompt), or - for the image on stdout; printed as given.")]
Format = Annotated[Optional[str], typer.Option("--format", help="Image format: png, jpg or tiff (default: from -o's suffix, else png).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files (never replaced otherwise).")]
Resume = Annotated[bool, typer.Option("--resume", help="Start from the last finished stage's checkpoint (same settings); batch: also skip finished entries.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object per image on stdout.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the plan and memory estimates, create nothing, load nothing (--dry-run --device cuda needs no GPU).")]
Device = Annotated[Optional[str], typer.Option("--device", help="auto, cuda, cuda:N, mps or cpu.")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="auto, fp16, bf16 or fp32.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle checkpoints (.ckpt/.pt/.pth/.bin; loading one can run code).")]
ModelConfig = Annotated[Optional[str], typer.Option("--config", help="Local diffusers folder giving configs and tokenizer for a single-file --model (offline).")]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="No progress or messages on stderr.")]
Verbose = Annotated[bool, typer.Option("-v", "--verbose", help="More detail; progress even when stderr is not a terminal.")]
LoraOpt = Annotated[Optional[list[str]], typer.Option("--lora", help="LoRA .safetensors file or hub id, optionally :WEIGHT (default 1); repeatable.")]
ControlNetOpt = Annotated[Optional[str], typer.Option("--controlnet", help="ControlNet for every stage: hub id, diffusers folder or single file (.safetensors; .ckpt/.pth with --allow-pickle); with --control-image.")]
ControlImage = Annotated[Optional[str], typer.Option("--control-image", help="The ControlNet's control image (resized to each stage).")]
ControlScale = Annotated[Optional[float], typer.Option("--control-scale", help="ControlNet conditioning scale (default 1).")]
TileControlNet = Annotated[Optional[str], typer.Option("--tile-controlnet", help="Tile ControlNet for the img2img stages (its control image: the stage's own input): hub id, diffusers folder or single file (.safetensors; .ckpt/.pth with --allow-pickle).")]
TileScale = Annotated[Optional[float], typer.Option("--tile-scale", help="Tile ControlNet conditioning scale (default 1).")]
IpAdapter = Annotated[Optional[str], typer.Option("--ip-adapter", help="IP-Adapter .safetensors (h94 layout) or hub id (h94/IP-Adapter); with --ip-image.")]
IpImage = Annotated[Optional[str], typer.Option("--ip-image", help="The IP-Adapter's reference image.")]
IpScale = Annotated[Optional[float], typer.Option("--ip-scale", help="IP-Adapter scale (default 1).")]
IpEncoder = Annotated[Optional[str], typer.Option("--ip-encoder", help="CLIP image encoder folder (default: image_encoder/ beside the adapter).")]
WorldSize = Annotated[Optional[int], typer.Option("--world-size", help="Plan for one image over N processes (band parallelism, as torchrun starts them; --max-vram is then per GPU). Under torchrun: the launcher's process count.")]
Template = Annotated[Optional[str], typer.Option("--name", help="File name template in -o: {index} {seed} {slug} {width} {height} {ext}, with format specs (default {index:04d}-{slug}.{ext}).")]


@dataclass(frozen=True)
class GenerationOptions:
    """Every flag the generating commands share; a new flag is one field here (and one in
    Request when the plan needs it)."""

    res: Res = None
    aspect: Aspect = None
    width: Width = None
    height: Height = None
    model: Model = None
    linfusion: Linfusion = None
    no_linfusion: NoLinfusion = False
    preset: PresetOpt = None
    seed: Seed = None
    steps: Steps = None
    guidance: Guidance = None
    negative: Negative = None
    strengths: Strengths = None
    scheduler: Scheduler = None
    method: Method = None
    max_vram: MaxVram = None
    vae_tile: VaeTile = None
    save_stages: SaveStages = False
    resume: Resume = False
    format: Format = None
    overwrite: Overwrite = False
    json: Json = False
    dry_run: DryRun = False
    device: Device = None
    dtype: Dtype = None
    allow_pickle: AllowPickle = False
    config: ModelConfig = None
    quiet: Quiet = False
    verbose: Verbose = False
    lora: LoraOpt = None
    controlnet: ControlNetOpt = None
    control_image: ControlImage = None
    control_scale: ControlScale = None
    tile_controlnet: TileControlNet = None
    tile_scale: TileScale = None
    ip_adapter: IpAdapter = None
    ip_image: IpImage = None
    ip_scale: IpScale = None
    ip_encoder: IpEncoder = None
    world_size: WorldSize = None

    def request(self, prompt: str, **extra):
        """The Request these flags ask for, checked before any batch line or model."""

        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise InputError(f"unknown scheduler {self.scheduler!r}; use {', '.join(SCHEDULERS)}")
        if self.method is not None and self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; use {' or '.join(METHODS)}")
        same = {f.name for f in fields(Request)} & {f.name for f in fields(self)}
        values = {name: getattr(self, name) for name in same}
        values.update(seed=None if self.seed == -1 else self.seed,
                      strengths=parse_strengths(self.strengths), loras=tuple(self.lora or ()))
        req = Request(prompt=prompt, **{**values, **extra})
        validate.request(req)
        return req


def shared_options(command):
    """Give a command every GenerationOptions field as its own option; it receives `opts`.

    Typer builds options from `inspect.signature`, so the dataclass's fields are spliced into
    the signature in place of the `opts` parameter, and gathered back on the way in.
    """
    names = [f.name for f in fields(GenerationOptions)]
    signature = inspect.signature(command, eval_str=True)  # the command's own annotations as objects
    own = [p for p in signature.parameters.values() if p.name != "opts"]
    spliced = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                 annotation=f.type) for f in fields(GenerationOptions)]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        opts = GenerationOptions(**{name: kwargs.pop(name) for name in names if name in kwargs})
        return command(*args, opts=opts, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + spliced)
    wrapper.__annotations__ = {p.name: p.annotation for p in own + spliced}
    del wrapper.__wrapped__  # Typer must read the spliced signature, not the original
    return wrapper


def parse_strengths(text: str | None) -> tuple[float, ...] | None:
    """'0.4,0.3' -> (0.4, 0.3); each in (0, 1], no empty item."""
    return None if text is None else strengths_text(text)
