"""Adapter keys in a preset YAML: the flags' names, relative paths taken from the preset's folder.

A preset may set `lora` (one FILE|ID[:WEIGHT] or a list), `controlnet`, `control_image`,
`control_scale`, `tile_controlnet`, `tile_scale`, `ip_adapter`, `ip_image`, `ip_scale` and
`ip_encoder`. Types are checked when the preset is read; the rest (files exist and fit the model,
images open) by adapters.plan.check_adapters when the plan is made, as for the flags. A flag
overrides the preset's key of the same name.
"""

from __future__ import annotations

from dataclasses import replace
import math
from pathlib import Path

from ..errors import InputError, PresetError
from ..bounds import shown
from ..inputs import expand

# preset key -> Request field (the flag's name with dashes as underscores; --lora is repeatable)
PRESET_KEYS = {"lora": "loras", "controlnet": "controlnet", "control_image": "control_image",
               "control_scale": "control_scale", "tile_controlnet": "tile_controlnet",
               "tile_scale": "tile_scale", "ip_adapter": "ip_adapter", "ip_image": "ip_image",
               "ip_scale": "ip_scale", "ip_encoder": "ip_encoder"}
_SCALES = ("control_scale", "tile_scale", "ip_scale")


def _path(value: str, folder: Path | None) -> str:
    """A relative path that exists beside the preset (or starts with ./ ../) from its folder;
    anything else as written (absolute paths, ~, hub ids)."""
    if value.startswith("~"):
        return expand(value)
    if folder is None or value.startswith("/"):
        return value
    candidate = folder / value
    if candidate.exists() or value.startswith(("./", "../")):
        return str(candidate)
    return value


def _lora(value: str, folder: Path | None) -> str:
    """FILE|ID[:WEIGHT] with its path part resolved as _path does."""
    if folder is not None and not (folder / value).exists() and ":" in value:
        head, _, tail = value.rpartition(":")
        try:
            float(tail)
        except ValueError:
            return _path(value, folder)  # parse_lora names the bad weight at plan time
        return f"{_path(head, folder)}:{tail}"
    return _path(value, folder)


def preset_adapters(data: dict, source: str) -> tuple:
    """Pop the adapter keys of a preset mapping: ((Request field, value), ...), sorted."""
    folder = None if source.startswith("bundled:") else Path(source).expanduser().parent
    out = {}
    for key in [k for k in data if k in PRESET_KEYS]:
        value = data.pop(key)
        if key == "lora":
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not items or \
                    not all(isinstance(v, str) and v for v in items):
                raise PresetError(f"{source}: key 'lora' must be FILE|ID[:WEIGHT] or a list of them, "
                                  f"got {shown(value)}")
            out["loras"] = tuple(_lora(v, folder) for v in items)
        elif key in _SCALES:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PresetError(f"{source}: key {key!r} must be a finite number, got {shown(value)}")
            out[key] = float(value)
        else:
            if not isinstance(value, str) or not value:
                raise PresetError(f"{source}: key {key!r} must be a path or hub id, got {shown(value)}")
            out[key] = _path(value, folder)
    return tuple(sorted(out.items()))


def merged_request(req, preset):
    """The request with the preset's adapter keys where the flags left them unset, and the
    fields taken from the preset."""
    taken = {k: v for k, v in getattr(preset, "adapters", ()) if getattr(req, k) in (None, ())}
    return replace(req, **taken), set(taken)


def name_preset_key(exc: InputError, taken: set[str], preset) -> InputError:
    """An adapter error about a value from the preset, with the preset file and key in front."""
    text = str(exc)
    for field in sorted(taken):
        flag = "--lora" if field == "loras" else "--" + field.replace("_", "-")
        if flag in text.split(":")[0].split():
            key = next(k for k, f in PRESET_KEYS.items() if f == field)
            return type(exc)(f"{preset.source}: key {key!r}: {text}")
    return exc
