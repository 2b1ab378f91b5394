"""LoRA: `--lora FILE|ID[:WEIGHT]`, kohya or diffusers/peft layouts, through diffusers + peft.

Loaded after LinFusion is mounted: the LinFusion layers keep the names and the q/k/v/out
Linear modules of the attention they replace (`...attn1.to_q` ...), so peft wraps them too and
a LoRA trained on the quadratic model adapts the linear one the same way.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import CheckpointMismatchError, InputError
from .file_checks import (family_of_cross_dim, is_local, loading_errors, require_file, safetensors_shapes,
                     short_hash)
from .lora_shapes import check_lora_tensors

_DOWN = re.compile(r"attn2[._]to_k.*(lora_down|lora_A|lora\.down|to_k_lora\.down)\.weight$")


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA as asked for and checked: where, how strong, its layout and hash."""

    source: str
    weight: float = 1.0
    name: str = ""  # adapter name (file stem or repo name), unique within a run
    layout: str | None = None  # kohya | peft | diffusers; None until checked (hub ids: at load)
    hash: str | None = None  # first 10 hex digits of sha256 (A1111 'Lora hashes')

    def to_dict(self) -> dict:
        return asdict(self)


def parse_lora(text: str) -> LoraSpec:
    """'file.safetensors', 'file.safetensors:0.7' or 'owner/repo:0.7' -> LoraSpec."""
    source, weight = text, 1.0
    if not Path(text).expanduser().exists() and ":" in text:
        source, _, tail = text.rpartition(":")
        try:
            weight = float(tail)
        except ValueError:
            raise InputError(f"--lora {text}: weight {tail!r} is not a number") from None
        if weight != weight or abs(weight) == float("inf"):
            raise InputError(f"--lora {text}: weight must be finite")
    if not source:
        raise InputError(f"--lora {text}: no file or hub id given")
    stem = Path(source).name
    for suffix in (".safetensors", ".bin"):
        stem = stem.removesuffix(suffix)
    return LoraSpec(source=source, weight=weight, name=re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "lora")


def _layout(keys) -> str | None:
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    if any(".lora.down." in k or "_lora.down." in k for k in keys):
        return "diffusers"
    return None


def check_lora(spec: LoraSpec, cross_attention_dim: int | None, unet_config: dict | None = None) -> LoraSpec:
    """A local file must exist, read, look like a LoRA and fit the model: text width, and each
    layer's widths, ranks and dtypes from the header (adapters/lora_shapes.py)."""
    if not is_local(spec.source):
        return spec  # a hub id: diffusers resolves and checks it when it loads
    path = require_file(spec.source, "--lora")
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise InputError(f"--lora: {path} must hold exactly one .safetensors file")
        path = files[0]
    dtypes: dict = {}
    shapes = safetensors_shapes(path, "--lora", dtypes)
    layout = _layout(shapes)
    if layout is None:
        raise InputError(f"--lora: {path.name} has no LoRA keys (kohya lora_unet_*, peft lora_A/lora_B)")
    dims = {shape[-1] for key, shape in shapes.items() if _DOWN.search(key)}
    if cross_attention_dim is not None and dims and dims != {cross_attention_dim}:
        dim = dims.pop()
        raise CheckpointMismatchError(
            f"--lora: {path.name} is for {family_of_cross_dim(dim, cross_attention_dim)} "
            f"(cross-attention input {dim}); this model's is {cross_attention_dim}")

    check_lora_tensors(path.name, shapes, dtypes, unet_config)
    return LoraSpec(source=str(path), weight=spec.weight, name=spec.name, layout=layout,
                    hash=short_hash(path))


def unique_names(specs: list[LoraSpec]) -> list[LoraSpec]:
    """Adapter names must differ (peft keys adapters by name): add -2, -3 ... to repeats."""
    seen: dict[str, int] = {}
    out = []
    for spec in specs:
        n = seen.get(spec.name, 0) + 1
        seen[spec.name] = n
        out.append(spec if n == 1 else LoraSpec(**{**spec.to_dict(), "name": f"{spec.name}-{n}"}))
    return out


def load_loras(pipe, specs: list[LoraSpec]) -> None:
    """Load every LoRA into the pipeline (UNet, and text encoders where the file has them)."""
    if not specs:
        return
    for spec in specs:
        path = Path(spec.source).expanduser()
        with loading_errors("--lora", spec.source):
            if path.is_file():
                pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=spec.name)
            else:
                pipe.load_lora_weights(spec.source, adapter_name=spec.name)
    pipe.set_adapters([s.name for s in specs], adapter_weights=[s.weight for s in specs])
