"""What a model is, found before any weights load: family, UNet/VAE configs, LinFusion weights.

Planning (sizes, strengths, memory) and loading both go through `resolve_model`, so the family
a dry run prints is the family that loads. Sources, in order: the demo names; a local diffusers
folder's configs; a single file's tensor names and shapes (configs from `--config` or the
bundled ones of its family); a hub id's configs in the Hugging Face cache; the bundled configs
of a known hub id's family. Only a hub id found nowhere offline falls back to a family the
caller names, and says so (`family_from`).
"""

from __future__ import annotations

from importlib import resources
import json
from dataclasses import dataclass
from pathlib import Path

from ..attention.matching import FAMILY_REPOS, KNOWN_BASES, require_linfusion_repo
from ..errors import InputError, ModelNotFoundError
from ..bounds import check_config
from ..inputs import regular_file
from ..io.weight_files import single_file_family, single_file_keys
from ..validate import json_object
from .tiny import DEMO_UNET_CONFIGS, DEMO_VAE_CONFIG

DEMO_PREFIX = "demo"  # "demo", "demo-sd21", "demo-sdxl": tiny random pipelines, no download
FAMILIES = ("sd15", "sd21", "sdxl")
# Short side of the images each family was trained on: the base stage's short side.
TRAINED_SHORT_SIDE = {"sd15": 512, "sd21": 768, "sdxl": 1024}
# Hub ids whose family is known without any file (the LinFusion repos' base models).
KNOWN_FAMILIES = {repo: family for family, base in FAMILY_REPOS.items()
                  for repo, weights in KNOWN_BASES.items() if weights == base}


@dataclass(frozen=True)
class ModelInfo:
    """One model as planning and loading both see it."""

    model: str  # what the user named
    family: str  # sd15 | sd21 | sdxl
    unet_config: dict
    vae_config: dict
    family_from: str  # where family and configs came from (shown by --dry-run)

    @property
    def assumed(self) -> bool:
        """True when nothing of the model was found and the family is the caller's guess."""
        return self.family_from.startswith("assumed")


def is_demo(model: str) -> bool:
    return model == DEMO_PREFIX or model.startswith(DEMO_PREFIX + "-")


def detect_family(unet_config) -> str:
    """sdxl (added size conditioning), sd21 (linear projections, 1024-dim text), else sd15."""
    get = unet_config.get if isinstance(unet_config, dict) else lambda k, d=None: getattr(unet_config, k, d)
    if get("addition_embed_type") == "text_time":
        return "sdxl"
    if get("use_linear_projection") or get("cross_attention_dim") == 1024:
        return "sd21"
    return "sd15"


def bundled_config(family: str, part: str) -> dict:
    """A shipped diffusers config of a family: part is "unet", "vae" or "scheduler"."""
    path = resources.files("linfusion_cli.models") / "configs" / f"{family}_{part}.json"
    if not path.is_file():
        raise InputError(f"no bundled {part} config for model family {family!r} "
                         f"(bundled: {', '.join(FAMILIES)})")
    return json.loads(path.read_text())


def _read_json(path: Path, what: str) -> dict:
    return json_object(path, what, ModelNotFoundError)


def _folder_configs(folder: Path) -> tuple[dict, dict]:
    """unet/config.json and vae/config.json of a local diffusers folder (malformed ones named)."""
    configs = {}

    for part in ("unet", "vae"):
        path = folder / part / "config.json"
        if path.exists():
            configs[part] = check_config(_read_json(path, f"the {part} config"), f"{path}", ModelNotFoundError)
    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(f"{folder} is not a diffusers model folder (no model_index.json)")
    for part in ("unet", "vae"):
        if part not in configs:
            raise ModelNotFoundError(f"{folder} is a diffusers folder without {part}/config.json")
    try:
        detect_family(configs["unet"])
    except Exception as exc:  # noqa: BLE001 -- a malformed field of any kind
        raise ModelNotFoundError(f"{folder / 'unet' / 'config.json'}: malformed field "
                                 f"({type(exc).__name__}: {exc})") from None
    return configs["unet"], configs["vae"]


def _cached_hub_configs(repo: str) -> tuple[dict, dict] | None:
    """A hub id's UNet and VAE configs from the Hugging Face cache (no network), if both are there."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    found = []
    for part in ("unet", "vae"):
        try:
            path = try_to_load_from_cache(repo, f"{part}/config.json")
        except Exception:  # noqa: BLE001 -- an id the hub client rejects is simply not cached
            return None
        if not isinstance(path, str):
            return None
        found.append(_read_json(Path(path), f"{repo} {part} config"))
    return found[0], found[1]


def _single_file(path: Path, config_dir: str | None, allow_pickle: bool) -> ModelInfo:
    family = single_file_family(single_file_keys(path, allow_pickle))
    if config_dir:
        unet, vae = _folder_configs(Path(config_dir).expanduser())
        if detect_family(unet) != family:
            raise InputError(f"{path.name} is an {family} checkpoint but --config {config_dir} "
                             f"holds {detect_family(unet)} configs")
        return ModelInfo(str(path), family, unet, vae, f"single file, configs of {config_dir}")
    return ModelInfo(str(path), family, bundled_config(family, "unet"), bundled_config(family, "vae"),
                     "single file's tensor names")


def resolve_model(model: str, *, config_dir: str | None = None, fallback_family: str = "sd15",
                  allow_pickle: bool = False) -> ModelInfo:
    """Family and configs of a model name, from the model itself wherever it can be read."""
    if is_demo(model):
        family = model.split("-", 1)[1] if "-" in model else "sd15"
        if family not in DEMO_UNET_CONFIGS:
            raise InputError(f"unknown demo model {model!r}; use demo, demo-sd21 or demo-sdxl")
        return ModelInfo(model, family, dict(DEMO_UNET_CONFIGS[family]), dict(DEMO_VAE_CONFIG),
                         "demo")
    path = Path(model).expanduser()
    if path.is_dir():
        unet, vae = _folder_configs(path)
        return ModelInfo(model, detect_family(unet), unet, vae, "local folder's configs")
    if path.is_file():
        return _single_file(path, config_dir, allow_pickle)
    if path.exists():  # a FIFO or device: opening it would block

        regular_file(path, "--model")
    if model.startswith((".", "/", "~")) or model.endswith((".safetensors", ".ckpt")) \
            or model.count("/") != 1:
        raise ModelNotFoundError(f"model not found: {model} (not a folder, file or hub id)")
    cached = _cached_hub_configs(model)
    if cached is not None:
        return ModelInfo(model, detect_family(cached[0]), cached[0], cached[1],
                         "Hugging Face cache's configs")
    family = KNOWN_FAMILIES.get(model)
    if family is not None:
        return ModelInfo(model, family, bundled_config(family, "unet"),
                         bundled_config(family, "vae"), "known hub id")
    return ModelInfo(model, fallback_family, bundled_config(fallback_family, "unet"),
                     bundled_config(fallback_family, "vae"),
                     f"assumed {fallback_family}: no configs of {model} found locally")


def info_of_pipeline(pipe, name: str | None = None) -> ModelInfo:
    """A caller's open diffusers pipeline as planning sees it: its own configs, its family."""
    name = name or getattr(pipe, "name_or_path", None) or "pipeline"
    unet, vae = dict(pipe.unet.config), dict(pipe.vae.config)
    return ModelInfo(str(name), detect_family(unet), unet, vae, "the given pipeline's configs")


def auto_linfusion(model: str, unet_config) -> str:
    """The weights "auto" means: fresh layers for the demo (they start from its own attention
    weights), else the official repo for this model (matching.require_linfusion_repo)."""
    return "fresh" if is_demo(model) else require_linfusion_repo(model, unet_config)


def resolve_linfusion(requested: str | None, info: ModelInfo) -> str | None:
    """"auto" -> the weights for this model, before loading it; anything else as given."""
    return auto_linfusion(info.model, info.unet_config) if requested == "auto" else requested


DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16",
               "bf16": "bf16", "bfloat16": "bf16"}
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def choose_dtypes(name: str | None, device_type: str, bf16_ok: bool) -> tuple[str, str]:
    """(UNet/text dtype, VAE dtype) names: fp16 on GPUs, fp32 on the CPU; the VAE never in fp16.

    fp16 VAEs overflow at large sizes (why SD-XL's config sets force_upcast); bf16 has fp32's
    exponent range, so it cannot overflow there and halves the VAE's memory against fp32.
    """
    if name in ("auto", "", None):
        unet = "fp16" if device_type in ("cuda", "mps") else "fp32"
    elif name in DTYPE_NAMES:
        unet = DTYPE_NAMES[name]
    else:
        raise InputError(f"unknown dtype {name!r}; use auto, fp32, fp16 or bf16")
    vae = ("bf16" if bf16_ok else "fp32") if unet == "fp16" else unet
    return unet, vae
