"""ControlNet and tile ControlNet on every stage, through diffusers' ControlNet pipelines.

LinFusion on the ControlNet: `ControlNetModel.from_unet` copies the UNet's down and middle
path, so a ControlNet's self-attention modules carry the UNet's module names
(`down_blocks.1.attentions.0.transformer_blocks.0.attn1`, ...). We replace each of them with a
LinFusion layer that keeps the ControlNet's own q/k/v/out weights (trained with the ControlNet)
and takes the nonlinear q/k projections (`to_q_`, `to_k_`) of the UNet's LinFusion layer of the
same name: those projections are what LinFusion distils per layer, and the ControlNet's layers
started as copies of exactly those UNet layers. No ControlNet-specific LinFusion weights exist.

Conditioning embedding: the ControlNet embeds its control image at full pixel resolution
(16-256 channels) before its first block. We wrap it (TiledConditioningEmbedding) so it runs
once per pipeline call instead of every step, tile by tile with a halo wider than its receptive
field (exactly the untiled result), on one copy when classifier-free guidance repeats the image.
"""

from __future__ import annotations

from pathlib import Path
import json

import torch
from PIL import Image
from torch import nn

from ..errors import CheckpointMismatchError, InputError, ModelNotFoundError
from .file_checks import family_of_cross_dim, is_local, require_file
from . import residuals
from ..attention.module import LinFusionAttention
from ..bounds import check_config
from ..inputs import read_bounded
from ..io import images  # images.open_image: a seam tests watch
from ..runtime.applied import KnobsInEffect
from .file_checks import reason
from .controlnet_file import file_format, from_unet_config, is_single_file, single_file_config, load_single_file
from .specs import ControlNetSpec
from .folder_weights import check_folder_weights

EMBED_TILE_PX = 1024  # conditioning-embedding tile side in input pixels (a multiple of 64)


# ---------------------------------------------------------------- checks before loading

def check_controlnet(source: str, what: str, unet_config: dict, allow_pickle: bool = False) -> ControlNetSpec:
    """A local ControlNet folder must hold a config that fits the UNet, a single file tensors
    that do (adapters/controlnet_file.py); hub ids: at load. The spec carries the config the
    planner counts and the loader uses, derived here once."""
    if not is_local(source):
        return ControlNetSpec(source, config=from_unet_config(unet_config))
    path = require_file(source, what)
    if is_single_file(path):
        config = single_file_config(path, unet_config, what, pickle_ok=allow_pickle)
        return ControlNetSpec(str(path), format=file_format(path), config=config)
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is None or not config_file.exists():
        raise InputError(f"{what}: {path} is neither a diffusers ControlNet folder (config.json) nor "
                         "a single-file ControlNet (.safetensors; .ckpt/.pth/.pt with --allow-pickle)")
    config = folder_config(config_file, what)
    if config.get("_class_name") not in (None, "ControlNetModel"):
        raise InputError(f"{what}: {path} holds a {config.get('_class_name')}, not a ControlNetModel")
    cross, want = config.get("cross_attention_dim"), unet_config.get("cross_attention_dim")
    if want is not None and cross != want:
        raise CheckpointMismatchError(f"{what}: {path.name} is for {family_of_cross_dim(cross, want)} "
                                      f"(cross-attention input {cross}); this model's is {want}")
    if list(config.get("block_out_channels", [])) != list(unet_config.get("block_out_channels", [])):
        raise CheckpointMismatchError(f"{what}: {path.name} has block channels "
                                      f"{config.get('block_out_channels')}, the UNet "
                                      f"{unet_config.get('block_out_channels')}")

    fmt = check_folder_weights(path, config, what, allow_pickle)
    return ControlNetSpec(str(path), format="pickle" if fmt == "pickle" else None, config=config)


def controlnet_config(source: str, unet_config: dict, what: str = "--controlnet",
                      allow_pickle: bool = False) -> dict:
    """The config a ControlNet loads with (check_controlnet's, without its checks): a single
    file's from its shapes, a folder's config.json, else what from_unet makes of this UNet."""
    path = Path(source).expanduser()
    if is_single_file(path):
        return single_file_config(path, unet_config, what, pickle_ok=allow_pickle)
    if (path / "config.json").is_file():
        return folder_config(path / "config.json", what)
    return from_unet_config(unet_config)


def folder_config(config_file, what: str) -> dict:
    """A ControlNet folder's config.json: a regular small JSON object with bounded sizes."""

    text = read_bounded(config_file, f"{what}: config")
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{what}: {config_file} is unreadable: {exc}") from None
    if not isinstance(config, dict):
        raise InputError(f"{what}: {config_file} must hold a JSON object")
    return check_config(config, f"{what}: {config_file}")


def check_scale(value: float | None, what: str, default: float = 1.0) -> float:
    value = default if value is None else float(value)
    if value != value or abs(value) == float("inf"):
        raise InputError(f"{what} must be a finite number, got {value}")
    return value


# ---------------------------------------------------------------- loading

def mount_linfusion(controlnet: nn.Module, unet: nn.Module) -> list[str]:
    """LinFusion on the ControlNet's attn1 modules named like the UNet's LinFusion layers."""
    mounted = []
    for name, unet_layer in unet.named_modules():
        if not isinstance(unet_layer, LinFusionAttention):
            continue
        try:
            original = controlnet.get_submodule(name)
        except AttributeError:
            continue  # the UNet's up path: no ControlNet copy
        if original.to_q.in_features != unet_layer.dim or original.heads != unet_layer.heads:
            raise CheckpointMismatchError(f"ControlNet {name} does not match the UNet's layer")
        layer = LinFusionAttention.from_attention(original, unet_layer.projection_mid_dim)
        layer.to_q_.load_state_dict(unet_layer.to_q_.state_dict())
        layer.to_k_.load_state_dict(unet_layer.to_k_.state_dict())
        layer.chunk_size = unet_layer.chunk_size
        layer.train(original.training)
        parent, _, child = name.rpartition(".")
        setattr(controlnet.get_submodule(parent), child, layer)
        mounted.append(name)
    return mounted


def load_controlnet(source: str, unet: nn.Module, what: str, *, pickle_ok: bool = False,
                    config: dict | None = None):
    """The ControlNetModel in the UNet's dtype, with LinFusion where the UNet has it.

    A single file loads with `config`, the one its shapes gave at plan time (the spec's; derived
    again when not given); a pickle one only with `pickle_ok` (the plan's format 'pickle',
    recorded only under --allow-pickle)."""
    from diffusers import ControlNetModel

    try:
        if is_single_file(Path(source).expanduser()):
            controlnet = load_single_file(Path(source).expanduser(), unet, what, pickle_ok=pickle_ok,
                                          config=config)
        else:
            # pickled .bin weights only with --allow-pickle (then torch.load(weights_only=True))
            controlnet = ControlNetModel.from_pretrained(source, torch_dtype=unet.dtype,
                                                         use_safetensors=None if pickle_ok else True)
    except (OSError, EnvironmentError) as exc:
        raise ModelNotFoundError(f"{what} {source}: could not be loaded (not in the local cache, "
                                 f"or offline): {reason(exc)}") from None
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 -- a folder whose weights do not load: one line

        raise CheckpointMismatchError(f"{what} {source} does not load: {reason(exc)}") from None
    return prepare_controlnet(controlnet, unet)


def prepare_controlnet(controlnet, unet: nn.Module):
    """What a run does to a loaded ControlNet (also the memory trace's meta one): eval mode,
    LinFusion where the UNet has it, the tiled and cached conditioning embedding."""
    controlnet.eval()
    layers = mount_linfusion(controlnet, unet)
    controlnet.controlnet_cond_embedding = TiledConditioningEmbedding(controlnet.controlnet_cond_embedding)
    controlnet.linfusion_layers = layers
    return controlnet


# ---------------------------------------------------------------- the conditioning embedding

def _halo(module: nn.Module) -> tuple[int, int]:
    """(halo in input px, total stride) of a stack of convolutions, from its layers in order."""
    radius, stride = 0, 1
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d):
            radius += (conv.kernel_size[0] // 2) * conv.dilation[0] * stride
            stride *= conv.stride[0]
    halo = -(-radius // stride) * stride  # whole output pixels
    return halo, stride


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal; the memory trace replaces it (meta tensors hold no values; the pipeline's
    CFG batch repeats one control image, so its rows are equal)."""
    return torch.equal(a, b)


class TiledConditioningEmbedding(nn.Module):
    """(B, 3, H, W) -> (B, C, H/8, W/8), once per control tensor, tile by tile, one copy for CFG."""

    def __init__(self, inner: nn.Module, tile_px: int = EMBED_TILE_PX):
        super().__init__()
        self.inner = inner
        self.tile_px = tile_px
        self.halo, self.stride = _halo(inner)
        self._input = self._value = None  # the last call's tensors (same storage: same result)
        self._row = self._row_value = None  # one control image (1, 3, H, W) and its embedding

    def reset(self) -> None:
        """Forget the cached embedding (after each pipeline call)."""
        self._input = self._value = self._row = self._row_value = None

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        old = self._input
        if old is not None and old.data_ptr() == cond.data_ptr() and old.shape == cond.shape:
            return self._value
        batch = cond.shape[0]
        rows_equal = all(_equal(cond[i], cond[0]) for i in range(1, batch))
        row = self._row
        if rows_equal and row is not None and row.shape[1:] == cond.shape[1:] and \
                row.dtype == cond.dtype and _equal(row[0], cond[0]):
            out = self._row_value.expand(batch, *self._row_value.shape[1:])  # CFG halves, copies
        elif rows_equal:
            self._row, self._row_value = cond[:1], self._tiled(cond[:1])
            out = self._row_value.expand(batch, *self._row_value.shape[1:])  # views, no memory
        else:
            out = self._tiled(cond)
        self._input, self._value = cond, out
        return out

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        """Exactly the untiled result: each tile is computed with `halo` px of real neighbours."""
        B, _, H, W = x.shape
        s, halo, tile = self.stride, self.halo, max(self.tile_px // self.stride * self.stride, self.stride)
        if H <= tile and W <= tile:
            return self.inner(x)
        out = None
        for y0 in range(0, H, tile):
            for x0 in range(0, W, tile):
                y1, x1 = min(y0 + tile, H), min(x0 + tile, W)
                ya, xa = max(0, y0 - halo), max(0, x0 - halo)
                yb, xb = min(H, y1 + halo), min(W, x1 + halo)
                part = self.inner(x[:, :, ya:yb, xa:xb])  # (B, C, (yb-ya)/s, (xb-xa)/s)
                if out is None:
                    out = part.new_empty(B, part.shape[1], H // s, W // s)
                out[:, :, y0 // s:y1 // s, x0 // s:x1 // s] = \
                    part[:, :, (y0 - ya) // s:(y1 - ya) // s, (x0 - xa) // s:(x1 - xa) // s]
        return out


# ---------------------------------------------------------------- memory knobs

def resized(path: str, width: int, height: int) -> Image.Image:
    """The control image at a stage's size (Lanczos), RGB."""
    image = images.open_image(path)
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def _reset(nets) -> None:
    for net in nets:
        embedding = getattr(net, "controlnet_cond_embedding", None)
        if isinstance(embedding, TiledConditioningEmbedding):
            embedding.reset()


def _pipeline(ctx, kind: str, nets: list):
    """diffusers' ControlNet pipeline of `kind` from the run's components (made once per run)."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

    cache = ctx.controlnet_pipes
    key = (kind, tuple(id(n) for n in nets))
    if key not in cache:
        auto = AutoPipelineForText2Image if kind == "txt2img" else AutoPipelineForImage2Image
        pipe = auto.from_pipe(ctx.txt2img, controlnet=nets[0] if len(nets) == 1 else nets)
        pipe.set_progress_bar_config(disable=True)
        cache[key] = pipe
    return cache[key]


def _stage_controlnets(ctx, stage, upscaled: Image.Image | None):
    """(nets, control images, scales) of the ControlNets the plan gives this stage (the planner
    decides which: Stage.controlnets); the tile ControlNet's control image is the stage's input."""
    loaded = ctx.model.controlnets
    nets, control_images, scales = [], [], []
    for kind, spec in zip(stage.controlnets, ctx.plan.adapters.controlnets(stage.controlnets)):
        nets.append(loaded[kind])
        control_images.append(upscaled if kind == "tile_controlnet"
                              else resized(spec.image, stage.width, stage.height))
        scales.append(spec.scale)
    return nets, control_images, scales


def text_to_image_call(ctx, stage, knobs: KnobsInEffect):
    """(pipeline, extra kwargs, done) for the base stage: its ControlNet, if any (`knobs`: what
    the stage's memory plan put on the UNet, for the residuals)."""
    nets, control_images, scales = _stage_controlnets(ctx, stage, None)
    if not nets:
        return ctx.txt2img, {}, lambda: None
    extra = {"image": control_images[0], "controlnet_conditioning_scale": scales[0]}
    return _installed(_pipeline(ctx, "txt2img", nets), nets, extra, knobs)


def image_to_image_call(ctx, stage, upscaled: Image.Image, knobs: KnobsInEffect):
    """(pipeline, extra kwargs, done) for an img2img stage: structure and/or tile ControlNet
    (`knobs` as text_to_image_call)."""
    nets, control_images, scales = _stage_controlnets(ctx, stage, upscaled)
    if not nets:
        return ctx.img2img, {}, lambda: None
    one = len(nets) == 1
    extra = {"control_image": control_images[0] if one else control_images,
             "controlnet_conditioning_scale": scales[0] if one else scales}
    return _installed(_pipeline(ctx, "img2img", nets), nets, extra, knobs)


def _installed(pipe, nets, extra, knobs: KnobsInEffect):
    """(pipe, extra, done): residuals made per UNet forward and added in place
    (adapters.residuals) for this call; done takes that off and forgets the cached embeddings."""
    undo = residuals.residuals_in_place(pipe.controlnet, pipe.unet, knobs) if residuals.ENABLED else None

    def done():
        if undo is not None:
            undo()
        _reset(nets)
    return pipe, extra, done
