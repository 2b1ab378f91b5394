"""Every generation option, declared once: its flags, help, rule, preset key and batch-line keys.

The surfaces are derived from OPTIONS, so a new option is one `Option(...)` here (plus the code
that uses its value):
  cli/options.py      GenerationOptions: one Typer option per `flags` (`--help`, README's table)
  planning/request.py Request: one field per option with `plan=True`
  planning/presets.py Preset: one field per `preset` key, read under `rule`
  io/prompts.py       PromptEntry: one field per option with `line` keys (JSON key, A1111 --key)
  io/image_identity.py what defines an image: every option with `defines_image=True`
The same `rule` (validate.py) checks the value on every path; callers put where it came from in
front of the message.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from typing import Any, Callable, Optional, Union, get_args, get_origin

from . import validate
from .errors import PlanError


COMMANDS = ("generate", "upscale", "batch")  # the commands that take generation options


@dataclass(frozen=True)
class Option:
    """One option of generate/upscale/batch (and of api.plan): what each surface needs of it."""

    name: str  # the Request field, api.plan's keyword
    type: Any  # the Request field's type
    help: str = ""  # --help and README's options table
    flags: tuple[str, ...] = ()  # the CLI flags; () for none
    default: Any = None  # the Request's default; None means "the preset's value"
    rule: Callable[[Any, str], Any] | None = None  # validate.py: (value, name) -> checked value
    preset: str | None = None  # the preset YAML key, if presets may set it
    preset_default: Any = None  # the value when neither flag nor preset gives one
    preset_null: bool = False  # a preset may write null (linfusion: null means none)
    line: tuple[str, ...] = ()  # batch-line keys: a JSON Lines key and the A1111 `--key`
    flag_type: Any = None  # the flag's type when it differs from `type` (text parsed by `parse`)
    parse: Callable[[Any, str], Any] | None = None  # a flag's or line's value -> the Request's
    plan: bool = True  # a Request field; False: how the CLI runs (--json, -q), not what it plans
    path: bool = False  # a local path: `~` expanded
    relative: bool = False  # in a preset, a relative path is taken from the preset's folder
    adapter: bool = False  # asks for an adapter (LoRA, ControlNet, IP-Adapter)
    label: str = ""  # the name messages use (default: the long flag)
    commands: tuple[str, ...] = COMMANDS  # the commands whose flags include it
    defines_image: bool = False  # the plan's value of this name is part of what defines an image
    # (io/image_identity.py: checkpoints, manifest lines and image records compare it); the options
    # that shape the stages, adapters, seed or input image are recorded through those instead

    @property
    def named(self) -> str:
        """How messages name a flag's or api's value: '--vae-tile', 'the prompt'."""
        return self.label or next((f for f in self.flags if f.startswith("--")),
                                  "--" + self.name.replace("_", "-"))

    @property
    def cli_type(self) -> Any:
        return self.flag_type or self.type

    @property
    def cli_default(self) -> Any:
        """What Typer passes when the flag is absent: False for switches, else None."""
        return False if self.cli_type is bool else None

    @property
    def kind(self) -> type:
        """The value's base type (Optional[int] -> int), for words read from A1111 lines."""
        kind = self.type
        if get_origin(kind) is Union:
            kind = next(a for a in get_args(kind) if a is not type(None))
        return kind


def _random_seed(value: Any, name: str) -> Any:
    """-1 asks for a random seed (None), on the command line as in AUTOMATIC1111 lines."""
    return None if value == -1 and not isinstance(value, bool) else value


def _text_list(value: Any, name: str) -> Any:
    """A repeated flag's list as the Request's tuple."""
    return tuple(value) if isinstance(value, list) else value


def _strengths_text(value: Any, name: str) -> Any:
    """'0.4,0.3' -> (0.4, 0.3)."""
    return validate.strengths_text(value, name) if isinstance(value, str) else value


# what several options share: a model-side path; an adapter's path (relative to a preset's
# folder there); an adapter's scale
_PATH = dict(path=True, rule=validate.text)
_ADAPTER = dict(path=True, relative=True, adapter=True, rule=validate.source)
_SCALE = dict(type=Optional[float], adapter=True, rule=validate.finite)

OPTIONS: tuple[Option, ...] = (
    Option("prompt", str, default=MISSING, rule=validate.text, line=("prompt",), label="the prompt",
           defines_image=True),
    Option("res", Optional[int], "Long side of the final image in px (default 4096); with --aspect.",
           ("--res",), rule=validate.side, line=("res",)),
    Option("aspect", Optional[str], "Aspect W:H with --res (default: the preset's, 1:1).", ("--aspect",),
           rule=validate.aspect_text, preset="aspect", preset_default="1:1"),
    Option("width", Optional[int], "Exact final width in px, with --height, instead of --res/--aspect.",
           ("--width",), rule=validate.side, line=("width",)),
    Option("height", Optional[int], "Exact final height in px, with --width.", ("--height",),
           rule=validate.side, line=("height",)),
    Option("model", Optional[str], "Hub id, local diffusers folder, single .safetensors file (.ckpt only "
           "with --allow-pickle; --config DIR gives it its configs offline), or demo, demo-sd21, demo-sdxl "
           "(tiny random models, no download).", ("--model",), preset="model",
           preset_default="Lykon/dreamshaper-8", defines_image=True, **_PATH),
    Option("linfusion", Optional[str], "LinFusion weights: hub id or folder (default: matched to the model: "
           "known ids, else by UNet architecture).", ("--linfusion",), preset="linfusion",
           preset_default="auto", preset_null=True, defines_image=True, **_PATH),
    Option("no_linfusion", bool, "Keep the UNet's own quadratic attention.", ("--no-linfusion",),
           default=False),
    Option("preset", Optional[str], "sd15, sd15-lowmem, sd21, sdxl, sdxl-lowmem, or a user preset name or "
           "YAML file (default: the model family's: sd15, sd21 or sdxl).", ("--preset",), **_PATH),
    Option("seed", Optional[int], "Run seed 0 .. 4294967295 (-1: random); stage k uses seed + k "
           "(default: random).", ("--seed",), rule=validate.seed, parse=_random_seed, line=("seed",)),
    Option("steps", Optional[int], "Nominal steps per stage; img2img runs steps x strength.", ("--steps",),
           rule=validate.steps, preset="steps", preset_default=50, line=("steps",)),
    Option("guidance", Optional[float], "Classifier-free guidance scale.", ("--guidance",),
           rule=validate.guidance, preset="guidance", preset_default=7.5, line=("guidance", "cfg_scale")),
    Option("negative", Optional[str], "Negative prompt.", ("--negative",), rule=validate.text,
           preset="negative", preset_default="", line=("negative", "negative_prompt"), defines_image=True),
    Option("strengths", Optional[tuple[float, ...]], "img2img strength per x2 stage, e.g. 0.4,0.3,0.2,0.1 "
           "(the last repeats).", ("--strengths",), rule=validate.strengths, flag_type=Optional[str],
           parse=_strengths_text, preset="strengths", preset_default=(0.4, 0.3, 0.2, 0.1)),
    Option("scheduler", Optional[str], "Sampler: default, ddim, euler, euler_a, dpm++, pndm, lms (lms "
           "needs scipy).", ("--scheduler",), rule=validate.scheduler, preset="scheduler",
           preset_default="ddim"),
    Option("method", Optional[str], "How the x2 stages denoise: sdedit (plain img2img) or demofusion (skip "
           "residual + dilated pass); default: the preset's (demofusion for the sdxl presets).",
           ("--method",), rule=validate.method, preset="method", preset_default="sdedit"),
    Option("max_vram", Optional[float], "Memory budget in GiB (default: the GPU's free memory); without a "
           "GPU here, --dry-run --max-vram N plans for an N GiB CUDA GPU.", ("--max-vram",),
           rule=validate.max_vram, preset="max_vram", preset_null=True),
    Option("vae_tile", Optional[int], "VAE tile size in px, 0 = untiled, else at least 64 (default: planned); the planner "
           "plans the rest around it.", ("--vae-tile",), rule=validate.vae_tile, preset="vae_tile_px",
           preset_null=True),
    Option("save_stages", bool, "Also keep every intermediate stage image beside the output "
           "(NAME.stageK-WxH.png, NAME its file name).", ("--save-stages",), default=False),
    Option("resume", bool, "Start from the last finished stage's checkpoint (same settings); batch: also "
           "skip finished entries.", ("--resume",), default=False, plan=False),
    Option("format", Optional[str], "Image format: png, jpg or tiff (default: from -o's suffix, else png).",
           ("--format",), plan=False),
    Option("overwrite", bool, "Replace existing output files (never replaced otherwise).", ("--overwrite",),
           default=False, plan=False),
    Option("json", bool, "Print one JSON object per image on stdout.", ("--json",), default=False,
           plan=False),
    Option("dry_run", bool, "Print the plan and memory estimates, create nothing, load nothing (--dry-run "
           "--device cuda needs no GPU).", ("--dry-run",), default=False),
    Option("device", Optional[str], "auto, cuda, cuda:N, mps or cpu.", ("--device",), rule=validate.device),
    Option("gpu", Optional[str], "GPU to plan and price for: h100, h100-pcie, a100, l40s, rtx4090, rtx3090, "
           "rtx3060, t4 (default: the one detected); without a GPU here, --dry-run --gpu NAME plans for it, "
           "its memory the default --max-vram.", ("--gpu",), rule=validate.gpu),
    Option("dtype", Optional[str], "auto, fp16, bf16 or fp32.", ("--dtype",), rule=validate.text,
           preset="dtype", preset_default="auto", defines_image=True),
    Option("allow_pickle", bool, "Allow pickle checkpoints (.ckpt/.pt/.pth/.bin; loading one can run code).",
           ("--allow-pickle",), default=False),
    Option("config", Optional[str], "Local diffusers folder giving configs and tokenizer for a single-file "
           "--model (offline).", ("--config",), **_PATH),
    Option("quiet", bool, "No progress or messages on stderr.", ("-q", "--quiet"), default=False, plan=False),
    Option("verbose", bool, "More detail; progress even when stderr is not a terminal.", ("-v", "--verbose"),
           default=False, plan=False),
    Option("progress", Optional[str], "Progress on stderr: bar (default), json (one JSON object per line, "
           "nothing else: docs/progress.md) or none.", ("--progress",), rule=validate.progress, plan=False),
    Option("preview", Optional[str], "Keep a live preview image (.png/.jpg) of the denoised estimate at this "
           "path, rewritten atomically as the run goes; batch: {index} or {name} in it, else -INDEX is "
           "added before the suffix.", ("--preview",), path=True, rule=validate.text),
    Option("preview_every", Optional[int], "Rewrite the preview every N denoising steps, and at each "
           "stage's end (default: about 10 per stage).", ("--preview-every",), rule=validate.preview_every),
    Option("preview_size", Optional[int], "The preview's long side at most N px (default 1024).",
           ("--preview-size",), rule=validate.preview_size),
    Option("preview_method", Optional[str], "latent2rgb (linear map of the latents), taesd (tiny VAE "
           "decoder) or auto (default: taesd when its weights are local).", ("--preview-method",),
           rule=validate.preview_method),
    Option("preview_taesd", Optional[str], "TAESD weights for the preview: hub id or folder (default "
           "madebyollin/taesd; madebyollin/taesdxl for SD-XL).", ("--preview-taesd",), **_PATH),
    Option("loras", tuple[str, ...], "LoRA .safetensors file or hub id, optionally :WEIGHT (default 1); "
           "repeatable.", ("--lora",), default=(), rule=validate.loras, flag_type=Optional[list[str]],
           parse=_text_list, preset="lora", preset_default=(), path=True, relative=True, adapter=True),
    Option("controlnet", Optional[str], "ControlNet for every stage: hub id, diffusers folder or single file "
           "(.safetensors; .ckpt/.pth with --allow-pickle); with --control-image.", ("--controlnet",),
           preset="controlnet", **_ADAPTER),
    Option("control_image", Optional[str], "The ControlNet's control image (resized to each stage).",
           ("--control-image",), preset="control_image", **_ADAPTER),
    Option("control_scale", help="ControlNet conditioning scale (default 1).", flags=("--control-scale",),
           preset="control_scale", **_SCALE),
    Option("tile_controlnet", Optional[str], "Tile ControlNet for the img2img stages (its control image: the "
           "stage's own input): hub id, diffusers folder or single file (.safetensors; .ckpt/.pth with "
           "--allow-pickle).", ("--tile-controlnet",), preset="tile_controlnet", **_ADAPTER),
    Option("tile_scale", help="Tile ControlNet conditioning scale (default 1).", flags=("--tile-scale",),
           preset="tile_scale", **_SCALE),
    Option("ip_adapter", Optional[str], "IP-Adapter .safetensors (h94 layout) or hub id (h94/IP-Adapter); "
           "with --ip-image.", ("--ip-adapter",), preset="ip_adapter", **_ADAPTER),
    Option("ip_image", Optional[str], "The IP-Adapter's reference image.", ("--ip-image",),
           preset="ip_image", **_ADAPTER),
    Option("ip_scale", help="IP-Adapter scale (default 1).", flags=("--ip-scale",), preset="ip_scale",
           **_SCALE),
    Option("ip_encoder", Optional[str], "CLIP image encoder folder (default: image_encoder/ beside the "
           "adapter).", ("--ip-encoder",), preset="ip_encoder", **_ADAPTER),
    Option("world_size", Optional[int], "Plan for one image over N processes (band parallelism, as "
           "torchrun starts them; --max-vram is then per GPU). Under torchrun: the launcher's process "
           "count.", ("--world-size",), rule=validate.world_size),
    Option("parallel", Optional[str], "Under torchrun: images (each rank makes whole images, the "
           "default) or bands (every image over all ranks, band-parallel).", ("--parallel",),
           rule=validate.parallel, plan=False, commands=("batch",)),
    # what upscale (and api.upscale) set: no flag, no preset key, no batch key
    Option("init_image", Optional[str], path=True, rule=validate.text),
    Option("init_size", Optional[tuple[int, int]]),
)


def flag_options() -> tuple[Option, ...]:
    """The options generate, upscale and batch share, in --help's order."""
    return tuple(o for o in OPTIONS if o.flags)


def plan_options() -> tuple[Option, ...]:
    """Request's fields."""
    return tuple(o for o in OPTIONS if o.plan)


def preset_options() -> tuple[Option, ...]:
    """The options a preset may set."""
    return tuple(o for o in OPTIONS if o.preset)


def line_options() -> tuple[Option, ...]:
    """The options a batch line may set."""
    return tuple(o for o in OPTIONS if o.line)


def image_options(options: tuple[Option, ...] = OPTIONS) -> tuple[str, ...]:
    """The names whose plan values define an image (io/image_identity.py)."""
    return tuple(o.name for o in options if o.defines_image)


def check_request(req) -> None:
    """Every value of a request under its option's rule, named as a flag; conflicts refused."""
    for option in plan_options():
        value = getattr(req, option.name)
        if option.rule is not None and value is not None and value != ():
            option.rule(value, option.named)
    if req.aspect is not None and (req.width is not None or req.height is not None):
        raise PlanError("--aspect cannot be combined with --width/--height")
    if req.linfusion is not None and req.no_linfusion:
        raise PlanError("--linfusion and --no-linfusion contradict each other; pass one")
