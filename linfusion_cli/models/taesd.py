"""TAESD (madebyollin's tiny VAE, diffusers' AutoencoderTiny) for --preview-method taesd/auto.

Found and checked when the plan is made, before any model loads: a folder's config must be an
AutoencoderTiny's with the model's latent channels and x8 upsampling, and its safetensors must
hold exactly the tensors (names and shapes) that config builds, whole; a hub id must be in the
local cache (no download is attempted here). Loaded beside the model: its decoder only, which
the preview runs on a downscaled latent.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError, ModelNotFoundError
from ..hub import download_command
from ..inputs import expand, regular_file
from ..validate import json_object
from . import tiny
from .resolve import is_demo

# the published TAESD per family: SD1.x and SD2.x share their VAE's latent space, SD-XL has its own
REPOS = {"sd15": "madebyollin/taesd", "sd21": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}
DEMO = "demo"  # a demo model's tiny random TAESD (models/tiny.py), built in the cache on first load
WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG = "config.json"
FLAG = "--preview-taesd"


@dataclass(frozen=True)
class TaesdInfo:
    """A TAESD as planning sees it."""

    source: str  # what was named: hub id, folder, or "demo"
    folder: str | None  # the local folder it loads from (None: the demo's, built at load)
    decoder_params: int  # parameters of its decoder (the preview's resident weights)
    decoder_width: int  # the decoder's widest channel count (the preview's activations)

    def to_dict(self) -> dict:
        return {"source": self.source, "folder": self.folder, "decoder_params": self.decoder_params}


def default_source(family: str, model: str) -> str:
    """The TAESD a model's family uses: the demo's for demo models, else the published one."""
    return DEMO if is_demo(model) else REPOS[family]


def _hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).exists()


def find(source: str, *, family: str, latent_channels: int, required: bool) -> TaesdInfo | None:
    """The TAESD `source` names, checked; None when it is not at hand locally and not `required`
    (--preview-method auto: then latent2rgb). Anything wrong with weights that are there is
    refused whether required or not: one line, before the model loads."""
    if source == DEMO:
        return _demo_info()
    if _hub_id(source):
        wrong = next((f for f, repo in REPOS.items() if repo == source and REPOS[family] != source), None)
        if wrong is not None:
            raise InputError(f"{FLAG} {source} is the TAESD of {wrong} models; this model is {family}: "
                             f"use {REPOS[family]}")
        folder = _cached(source)
        if folder is None:
            if not required:
                return None
            raise ModelNotFoundError(
                f"TAESD {source} is not in the local cache (nothing is downloaded for a preview); run "
                f"`{download_command(source)}` on a connected machine, pass a folder with {FLAG}, "
                "or use --preview-method latent2rgb")
        return check_folder(folder, source=source, latent_channels=latent_channels)
    path = Path(expand(source))
    if not path.exists():
        raise ModelNotFoundError(f"{FLAG} {source}: not found (not a folder or hub id)")
    if not path.is_dir():
        raise InputError(f"{FLAG} {source}: name the TAESD folder (with {CONFIG} and {WEIGHTS})")
    return check_folder(path, source=source, latent_channels=latent_channels)


def _cached(repo: str) -> Path | None:
    """The hub snapshot's folder when config and weights are in the local cache, else None."""
    try:
        from huggingface_hub import try_to_load_from_cache  # slow to import; only a TAESD preview asks
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    found = []
    for name in (CONFIG, WEIGHTS):
        try:
            path = try_to_load_from_cache(repo, name)
        except Exception:  # noqa: BLE001 -- an id the hub client rejects is simply not cached
            return None
        if not isinstance(path, str):
            return None
        found.append(Path(path))
    return found[0].parent if found[0].parent == found[1].parent else None


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """{tensor: shape} that an AutoencoderTiny of `config` has (built on meta: no memory)."""
    from diffusers import AutoencoderTiny  # seconds to import; only a TAESD preview needs it

    accepted = inspect.signature(AutoencoderTiny.__init__).parameters  # saved configs carry extra keys
    with torch.device("meta"):
        model = AutoencoderTiny(**{k: v for k, v in config.items() if k in accepted and k != "self"})
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor: shape} of a safetensors file, read without its data (a truncated file refused)."""
    try:
        from safetensors import safe_open  # header only, when a TAESD preview is asked for

        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 -- SafetensorError: a header that is not one
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"TAESD weights {path} are not a readable .safetensors file: {why}") from None


def check_folder(folder: str | os.PathLike, *, source: str, latent_channels: int) -> TaesdInfo:
    """A TAESD folder whose config and weights fit the model; else one line naming what not."""
    folder = Path(folder)
    config = json_object(regular_file(folder / CONFIG, f"TAESD config of {source}"), "TAESD config")
    name = config.get("_class_name")
    if name is not None and name != "AutoencoderTiny":
        raise InputError(f"{FLAG} {source}: {folder / CONFIG} is for {name}, not AutoencoderTiny (TAESD)")
    if name is None and "decoder_block_out_channels" not in config:
        raise InputError(f"{FLAG} {source}: {folder / CONFIG} is no AutoencoderTiny (TAESD) config")
    channels = config.get("latent_channels", 4)
    if channels != latent_channels:
        raise InputError(f"{FLAG} {source}: a TAESD for {channels}-channel latents; this model's VAE "
                         f"has {latent_channels}")
    blocks = config.get("decoder_block_out_channels", (64, 64, 64, 64))
    if config.get("upsampling_scaling_factor", 2) ** (len(blocks) - 1) != 8:
        raise InputError(f"{FLAG} {source}: its decoder does not upsample x8 as the model's VAE does")
    weights = folder / WEIGHTS
    if not weights.exists():
        raise ModelNotFoundError(f"{FLAG} {source}: no {WEIGHTS} in {folder} (only .safetensors are read)")
    found = _header(regular_file(weights, "TAESD weights"))
    try:
        expected = _expected_shapes(config)
    except Exception as exc:  # noqa: BLE001 -- a config diffusers cannot build
        raise InputError(f"{FLAG} {source}: {folder / CONFIG} does not build an AutoencoderTiny: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    for key, shape in expected.items():
        if key not in found:
            raise InputError(f"{FLAG} {source}: {WEIGHTS} lacks {key}; these are not TAESD weights "
                             "for its config")
        if found[key] != shape:
            raise InputError(f"{FLAG} {source}: {key} is {list(found[key])} in {WEIGHTS}, its config "
                             f"asks for {list(shape)}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise InputError(f"{FLAG} {source}: {WEIGHTS} holds {extra[0]}, which no AutoencoderTiny of "
                         "its config has")
    return TaesdInfo(source=source, folder=str(folder), decoder_params=_decoder_params(found),
                     decoder_width=max(blocks))


def _decoder_params(shapes: dict) -> int:
    total = 0
    for key, shape in shapes.items():
        if key.startswith("decoder."):
            n = 1
            for d in shape:
                n *= d
            total += n
    return total


def _demo_info() -> TaesdInfo:
    """The demo's TAESD, known from its config (built in the cache only when a run loads it)."""
    config = dict(tiny.DEMO_TAESD_CONFIG)
    return TaesdInfo(source=DEMO, folder=None, decoder_params=_decoder_params(_expected_shapes(config)),
                     decoder_width=max(config["decoder_block_out_channels"]))


def demo_folder(cache: Path) -> Path:
    """The demo TAESD in `cache`, built once (save_pretrained) whatever number of processes start."""
    import fcntl  # POSIX only; the demo cache is built where the CLI runs

    folder = cache / "demo-taesd-v1"
    if (folder / WEIGHTS).is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    lock_path = folder.with_name(folder.name + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / WEIGHTS).is_file():
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            tiny.save_tiny_taesd(tmp)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process built it first
                shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            lock_path.unlink()
    return folder


def load_decoder(info: TaesdInfo, *, cache: Path, device: torch.device, dtype: torch.dtype):
    """The TAESD's decoder on `device` in `dtype`, eval mode (the encoder is not kept)."""
    from diffusers import AutoencoderTiny  # seconds to import; loaded beside the model only

    folder = Path(info.folder) if info.folder is not None else demo_folder(cache)
    try:
        model = AutoencoderTiny.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 -- checked at plan time; changed since: one line
        raise ModelNotFoundError(f"cannot load the TAESD in {folder}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    decoder = model.decoder.to(device=device, dtype=dtype).eval()
    decoder.requires_grad_(False)
    return decoder


def describe(info: TaesdInfo | None) -> str:
    """The dry run's words for a TAESD."""
    if info is None:
        return ""
    where = "a tiny random one, no download" if info.folder is None else info.folder
    return f"{info.source} ({where})"

