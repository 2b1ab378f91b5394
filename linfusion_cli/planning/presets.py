"""Presets: YAML files naming a model, its LinFusion weights, a stage ladder and a memory policy.

Bundled presets live in the repository's top-level `presets/` folder (shipped in the wheel as
`linfusion_cli/presets/`); user presets in
`$LINFUSION_CONFIG_DIR/presets` or `~/.config/linfusion/presets` override them by name.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import yaml

from .. import validate
from ..bounds import shown
from ..errors import InputError, PresetError
from ..bounds import check_yaml
from ..errors import PlanError, ModelNotFoundError
from ..inputs import expand, home, read_bounded
from ..schema import preset_options
from .memory.knob_table import KNOB
from .method import DemoFusion
from .option_classes import Preset
from .preset_keys import read_option_keys

FAMILIES = ("sd15", "sd21", "sdxl")
DEFAULT_PRESET = "sd15"

_TYPES = {"description": str, "family": str, "native": (int, type(None)), "memory": dict,
          "cosine_scale_1": (int, float), "cosine_scale_2": (int, float),
          "cosine_scale_3": (int, float), "gaussian_sigma": (int, float)}


def _check_memory(knobs: dict, source: str) -> tuple:
    """A preset's `memory:` mapping, checked knob by knob against the knob table's rules."""
    for name, value in knobs.items():
        knob = KNOB.get(name)
        if knob is None:
            raise PresetError(f"{source}: unknown memory knob {name!r} (known: {', '.join(KNOB)})")
        ok = isinstance(value, knob.kind) and (knob.kind is bool or not isinstance(value, bool))
        if not (ok and knob.allowed(value)):
            raise PresetError(f"{source}: memory knob {name!r} must be {knob.rule}, got {shown(value)}")
    return tuple(sorted(knobs.items()))


def _native(source: str, value):
    """The base stage's short side, under the flags' size rule; the message names the key."""
    try:
        return validate.side(value, "native")
    except InputError as exc:
        raise PresetError(f"{source}: key 'native': {exc}") from None


def user_preset_dir() -> Path:
    """Where user presets live."""
    root = os.environ.get("LINFUSION_CONFIG_DIR")
    if root:
        return Path(expand(root)) / "presets"
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else home() / ".config") / "linfusion" / "presets"


def parse_preset(text: str, *, name: str, source: str) -> Preset:
    """Validate one preset's YAML; every error names the file and the key."""
    check_yaml(text, source, PresetError)  # nesting, alias expansion, repeated keys
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PresetError(f"{source}:{where} malformed YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PresetError(f"{source}: a preset must be a mapping of keys to values")

    options = read_option_keys(data, source)  # the flags' keys (steps, lora, ...), popped and checked
    for key, value in data.items():
        if key not in _TYPES:
            known = ", ".join(sorted([*_TYPES, *(o.preset for o in preset_options())]))
            raise PresetError(f"{source}: unknown key {shown(key)} (known: {known})")
        if isinstance(value, bool) or not isinstance(value, _TYPES[key]):
            raise PresetError(f"{source}: key {key!r} has the wrong type ({type(value).__name__})")
    if "memory" in data and len(data["memory"]) > len(KNOB):
        raise PresetError(f"{source}: key 'memory' has {len(data['memory'])} knobs; known: {', '.join(KNOB)}")
    if "family" in data and data["family"] not in FAMILIES:
        raise PresetError(f"{source}: key 'family' must be one of {', '.join(FAMILIES)}")
    if data.get("native") is not None:
        data["native"] = _native(source, data["native"])
    _check_demofusion_keys(data, source)
    if "memory" in data:
        data["memory"] = _check_memory(data["memory"], source)
        under = dict(data["memory"]).get("vae_tile_px")
        if options.get("vae_tile") is not None and under is not None and under != options["vae_tile"]:
            raise PresetError(f"{source}: vae_tile_px is {options['vae_tile']} at the top and {under} "
                              "under memory:; keep one")
    return Preset(name=name, source=source, **data, **options)


def _check_demofusion_keys(data: dict, source: str) -> None:
    """The demofusion numbers are in range (PresetError naming the key)."""
    try:
        names = ("cosine_scale_1", "cosine_scale_2", "cosine_scale_3", "gaussian_sigma")
        DemoFusion(**{k: float(data[k]) for k in names if k in data}).check("key")
    except PlanError as exc:
        raise PresetError(f"{source}: {exc}") from None
    for k in ("cosine_scale_1", "cosine_scale_2", "cosine_scale_3", "gaussian_sigma"):
        if k in data:
            data[k] = float(data[k])


def bundled_folder():
    """The shipped presets: linfusion_cli/presets in an installed wheel, else the top-level
    presets/ of a source checkout (an editable install maps no data folder into the package)."""
    installed = resources.files("linfusion_cli") / "presets"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "presets"


def bundled_presets() -> dict[str, str]:
    """Name -> YAML text of the presets shipped with the package."""
    folder = bundled_folder()
    return {p.name[:-5]: p.read_text() for p in folder.iterdir() if p.name.endswith(".yaml")}


def available_presets() -> dict[str, str]:
    """Name -> source (bundled:NAME or a file path); user presets override bundled ones."""
    found = {name: f"bundled:{name}" for name in bundled_presets()}
    folder = user_preset_dir()
    if folder.is_dir():  # a FIFO or folder named *.yaml is listed, and refused when read
        found.update({p.stem: str(p) for p in sorted(folder.glob("*.yaml"))})
    return dict(sorted(found.items()))


def load_preset(name_or_file: str | None) -> Preset:
    """A preset by bundled/user name, or from a YAML file path."""
    name_or_file = name_or_file or DEFAULT_PRESET
    path = Path(name_or_file).expanduser()
    if name_or_file.endswith((".yaml", ".yml")) or (path.exists() and not path.is_dir()):
        return parse_preset(_read(path), name=path.stem, source=str(path))
    known = available_presets()
    if name_or_file not in known:
        raise PresetError(f"unknown preset {name_or_file!r}; available: {', '.join(known)}")
    source = known[name_or_file]
    if source.startswith("bundled:"):
        return parse_preset(bundled_presets()[name_or_file], name=name_or_file, source=source)
    return parse_preset(_read(Path(source)), name=name_or_file, source=source)


def _read(path: Path) -> str:
    """A preset file's text: a regular file (FIFOs and devices refused before opening), at most
    1 MiB of UTF-8; anything else is one PresetError line."""

    try:
        return read_bounded(path, "preset", limit=1 << 20, error=PresetError)
    except ModelNotFoundError as exc:
        raise PresetError(str(exc)) from None

