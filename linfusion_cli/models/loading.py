"""Load a Stable Diffusion pipeline from a hub id, a local folder, a single file, or `demo`.

Also: family detection (SD1.x / SD2.x / SD-XL), device and dtype choice, scheduler swap, and
mounting LinFusion. Everything the user got wrong becomes one ModelNotFoundError/InputError line.
"""

from __future__ import annotations

import errno
import shutil
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError, ModelNotFoundError, PlanError
from ..io.weight_files import single_file_family, single_file_keys
from .resolve import DEMO_PREFIX, auto_linfusion, choose_dtypes, detect_family, is_demo
from ..adapters import mount_adapters
from ..adapters.specs import AdapterSpecs
from ..adapters.file_checks import reason
from ..attention import apply_linfusion
from ..hub import download_command
from ..inputs import expand, home
from . import tiny
from .tiny import FAMILIES

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
}
# A1111 sampler names, for the `parameters` metadata other tools read.
SAMPLER_NAMES = {
    "DDIMScheduler": "DDIM", "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a", "DPMSolverMultistepScheduler": "DPM++ 2M",
    "PNDMScheduler": "PLMS", "LMSDiscreteScheduler": "LMS",
}


@dataclass
class LoadedModel:
    """One set of components that serves every stage of a run."""

    pipe: object  # a diffusers text-to-image pipeline
    model: str  # what the user asked for
    family: str  # sd15 | sd21 | sdxl
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    linfusion: str | None = None  # weights used: repo id, path, "fresh", or None
    linfusion_layers: list[str] = field(default_factory=list)
    adapters: AdapterSpecs = field(default_factory=AdapterSpecs)  # what was mounted (adapters.check_adapters)
    controlnets: dict = field(default_factory=dict)  # kind -> ControlNetModel (adapters.controlnet)
    preview_decoder: object = None  # --preview-method taesd: the TAESD decoder (models/taesd.py)

    @property
    def sampler(self) -> str:
        name = type(self.pipe.scheduler).__name__
        return SAMPLER_NAMES.get(name, name)


def cache_dir() -> Path:
    """Where linfusion keeps its own files (the demo model)."""
    if os.environ.get("LINFUSION_CACHE"):
        return Path(expand(os.environ["LINFUSION_CACHE"]))
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else home() / ".cache") / "linfusion"


def resolve_device(name: str = "auto") -> torch.device:
    """cuda if present, then mps, then cpu; an explicit device that is missing is an error."""
    if name in ("auto", "", None):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use auto, cuda, cuda:N, mps or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but no CUDA device is available")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps asked for, but MPS is not available")
    return device


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: CUDA compute capability 8.0 (Ampere) and above. torch's
    is_bf16_supported() also says yes where it is emulated (T4, V100: cuDNN's slow fallback)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_dtypes(name: str, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(UNet/text dtype, VAE dtype) on a real device (resolve.choose_dtypes picks the names)."""
    bf16_ok = native_bf16(device)
    unet, vae = choose_dtypes(name, device.type, bf16_ok)
    return TORCH_DTYPES[unet], TORCH_DTYPES[vae]


def demo_folder(name: str = DEMO_PREFIX) -> Path:
    """The cached tiny demo pipeline, built deterministically on first use."""
    family = name.split("-", 1)[1] if "-" in name else "sd15"
    if family not in FAMILIES:
        raise InputError(f"unknown demo model {name!r}; use demo, demo-sd21 or demo-sdxl")
    folder = cache_dir() / f"demo-{family}-v2"
    if not (folder / "model_index.json").is_file():
        try:
            _build_demo(folder, family)
        except OSError as exc:  # a read-only or full cache: say which folder, not "not downloaded"
            raise InputError(f"cannot build the demo model in {folder.parent}: "
                             f"{exc.strerror or exc} (set LINFUSION_CACHE to a writable folder)") from None
    return folder


def _build_demo(folder: Path, family: str) -> None:
    """Build the demo pipeline into the cache once, whatever number of processes start at once."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    # several processes (torchrun ranks) may start at once: one builds, the others wait for it
    lock_path = folder.with_name(folder.name + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "model_index.json").is_file():
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            tiny.save_tiny_pipeline(tmp, family, demo=True)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process built it first
                shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):  # waiters re-check model_index.json and skip the build
            lock_path.unlink()


def _from_pretrained(source: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    kwargs = {"torch_dtype": dtype}
    try:
        return DiffusionPipeline.from_pretrained(source, **kwargs, safety_checker=None,
                                                 requires_safety_checker=False)
    except TypeError:  # pipelines without a safety checker (SD-XL)
        return DiffusionPipeline.from_pretrained(source, **kwargs)


# diffusers' default config repo per single-file kind (DIFFUSERS_DEFAULT_PIPELINE_PATHS)
_SINGLE_FILE_BASES = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
                      "sd21": "stabilityai/stable-diffusion-2-1",
                      "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


def _from_single_file(path: Path, dtype: torch.dtype, config: str | None, allow_pickle: bool = False):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    family = single_file_family(single_file_keys(path, allow_pickle))
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kwargs = {"torch_dtype": dtype}
    if config:
        kwargs["config"] = config
    try:
        return cls.from_single_file(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        if config:
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelNotFoundError(f"could not load {path.name} with the configs of {config}: "
                                     f"{why}") from exc
        exc.base_repo = _SINGLE_FILE_BASES[family]  # named in open_pipeline's message
        raise


def open_pipeline(model: str, dtype: torch.dtype, *, allow_pickle: bool = False,
                  config: str | None = None):
    """The diffusers pipeline for a demo name, local folder, single file or hub id."""
    path = Path(model).expanduser()
    try:
        if is_demo(model):
            return _from_pretrained(str(demo_folder(model)), dtype)
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ModelNotFoundError(f"{path} is not a diffusers model folder (no model_index.json)")
            return _from_pretrained(str(path), dtype)
        if path.is_file():
            if path.suffix in (".ckpt", ".pt", ".pth", ".bin") and not allow_pickle:
                raise InputError(f"{path.name} is a pickle checkpoint, which can run code when "
                                 "loaded; convert it to .safetensors or pass --allow-pickle")
            if path.suffix != ".safetensors" and not allow_pickle:
                raise InputError(f"{path.name}: single-file models must be .safetensors")
            return _from_single_file(path, dtype, config, allow_pickle)
        if model.startswith((".", "/", "~")) or model.endswith((".safetensors", ".ckpt")) \
                or model.count("/") != 1:
            raise ModelNotFoundError(f"model not found: {model} (not a folder, file or hub id)")
        return _from_pretrained(model, dtype)
    except (InputError, ModelNotFoundError):
        raise
    except Exception as exc:
        detail = reason(exc)
        if _not_writable(exc):  # a read-only cache is not a missing download
            raise ModelNotFoundError(f"model {model}: a cache folder is not writable ({detail}); point "
                                     "HF_HOME (and LINFUSION_CACHE) at a writable folder") from exc
        if path.is_dir():  # a local folder (a truncated .safetensors ...): nothing to download
            raise ModelNotFoundError(f"local model folder {path} is incomplete or corrupt: {detail}") from exc
        if not isinstance(exc, (OSError, ValueError)):
            raise

        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        why = "offline mode (HF_HUB_OFFLINE=1)" if offline else "it could not be downloaded"
        if path.is_file():
            base = getattr(exc, "base_repo", None) or "<base repo>"
            raise ModelNotFoundError(
                f"{path.name} is a single file without its diffusers configs (architecture, "
                f"tokenizer, scheduler of {base}), which are not in the local cache and {why}; run "
                f"`{download_command(base, ('*.json', '*.txt'))}` on a connected "
                "machine, or pass a local diffusers folder of the same family as config") from exc
        raise ModelNotFoundError(
            f"model {model} is not in the local cache and {why}; run `{download_command(model)}` "
            f"on a connected machine, or pass a local diffusers folder with --model") from exc


def _not_writable(exc: BaseException) -> bool:
    """exc (or its cause) is a permission or read-only-filesystem error."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return True
        if "Read-only file system" in str(exc) or "Permission denied" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def set_scheduler(pipe, name: str) -> None:
    """Swap the scheduler, keeping the model's own noise schedule and prediction type."""
    if name in ("default", "", None):
        return
    if name not in SCHEDULERS:
        raise InputError(f"unknown scheduler {name!r}; use default, {', '.join(SCHEDULERS)}")
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name][0])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def load_model(model: str, *, dtype: str = "auto", device: str = "auto", linfusion: str | None = "auto",
               scheduler: str = "default", allow_pickle: bool = False, config: str | None = None,
               channels_last: bool | None = None, family: str | None = None, adapters: AdapterSpecs | None = None,
               on_host: bool = False) -> LoadedModel:
    """Open the pipeline, pick dtypes and device, mount LinFusion and adapters; one object for
    all stages. on_host: every stage's plan offloads, so the offloadable models stay in host
    memory (each plan brings what it needs to the device when it needs it).

    `family` is what the plan was made for: a model that turns out to be another family is
    refused here, before any stage runs, rather than run under a plan made for something else.
    """
    torch_device = resolve_device(device)
    unet_dtype, _ = resolve_dtypes(dtype, torch_device)
    pipe = open_pipeline(model, unet_dtype, allow_pickle=allow_pickle, config=config)
    return prepare_model(pipe, model=model, dtype=dtype, device=device, linfusion=linfusion,
                         scheduler=scheduler, channels_last=channels_last, family=family,
                         adapters=adapters, on_host=on_host)


ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
# the models a memory plan may offload, in the order a stage runs them (pipeline/knobs.py)
OFFLOADABLE = ("text_encoder", "text_encoder_2", "image_encoder", "unet", "vae")


def gpu_defaults() -> None:
    """CUDA settings that help this workload, set before the first allocation: expandable
    segments (bands and tiles of changing sizes fragment a caching allocator; kept if the user
    set the allocator's variable), cuDNN autotuning (the same conv shapes run every step) and
    TF32 for the float32 fallbacks (a VAE or UNet widened after NaNs)."""
    if not any(os.environ.get(v) for v in ALLOC_CONF_VARS):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def prepare_model(pipe, *, model: str, dtype: str = "auto", device: str = "auto",
                  linfusion: str | None = "auto", scheduler: str = "default",
                  channels_last: bool | None = None, family: str | None = None,
                  adapters: AdapterSpecs | None = None, on_host: bool = False) -> LoadedModel:
    """An open diffusers pipeline made ready for a plan, in place: dtypes, scheduler, LinFusion
    layers, adapters, device. load_model's second half, and the way in for a caller's own pipeline."""
    torch_device = resolve_device(device)
    unet_dtype, vae_dtype = resolve_dtypes(dtype, torch_device)
    found = detect_family(pipe.unet.config)
    if family is not None and found != family:
        raise PlanError(f"{model} is an {found} model but the plan was made for {family} (its "
                        f"configs were not found before loading); pass --preset {found}")
    for part in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, part, None)
        if module is not None and module.dtype != unet_dtype:
            module.to(dtype=unet_dtype)
    if pipe.vae.dtype != vae_dtype:
        pipe.vae.to(dtype=vae_dtype)
    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    if linfusion == "auto":
        linfusion = auto_linfusion(model, pipe.unet.config)
    layers, controlnets = [], {}
    if linfusion is not None:
        layers = apply_linfusion(pipe.unet, None if linfusion == "fresh" else linfusion)
    if adapters:  # after LinFusion, so LoRA reaches its projections too

        controlnets = mount_adapters(pipe, adapters, torch_device)
    if torch_device.type == "cuda":
        gpu_defaults()
    if on_host:  # the plan offloads them: never first moved to the device (and back)
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module) and name not in OFFLOADABLE:
                module.to(torch_device)
    else:
        pipe.to(torch_device)
    if channels_last is None:
        channels_last = torch_device.type in ("cpu", "cuda")
    if channels_last:
        # oneDNN's convolutions run about 2x faster on channels-last tensors at the small channel
        # counts of the up-sampling path, and cuDNN's fp16/bf16 tensor-core convolutions take
        # NHWC natively (NCHW costs a transpose per conv); the result is the same up to float
        # summation order. Band buffers (bands/) are allocated in the layout of what they hold.
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        for net in controlnets.values():
            net.to(memory_format=torch.channels_last)
    return LoadedModel(pipe=pipe, model=model, family=found, device=torch_device, dtype=unet_dtype,
                       vae_dtype=vae_dtype, linfusion=linfusion, linfusion_layers=layers,
                       adapters=adapters or AdapterSpecs(), controlnets=controlnets)
