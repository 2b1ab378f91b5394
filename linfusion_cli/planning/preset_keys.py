"""A preset's option keys (schema.OPTIONS with a `preset` key): read under the flag's rule, adapter
paths taken from the preset's folder, and merged under the flags when the plan is made.

Types and rules are checked when the preset is read; the rest (files exist and fit the model,
images open) by adapters.attach.check_adapters when the plan is made, as for the flags. A flag
overrides the preset's key of the same option.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..errors import InputError, PresetError
from ..inputs import expand
from ..schema import preset_options


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


def read_option_keys(data: dict, source: str) -> dict:
    """Pop the option keys of a preset mapping: {option name: checked value}; every error names
    the file and the key."""
    folder = None if source.startswith("bundled:") else Path(source).expanduser().parent
    out = {}
    for option in preset_options():
        if option.preset not in data:
            continue
        key, value = option.preset, data.pop(option.preset)
        if value is None:
            if not option.preset_null:
                raise PresetError(f"{source}: key {key!r} has the wrong type (NoneType)")
            out[option.name] = None
            continue
        try:
            value = option.rule(value, key)
        except InputError as exc:
            raise PresetError(f"{source}: key {key!r}: {exc}") from None
        if option.relative:
            value = tuple(_lora(v, folder) for v in value) if isinstance(value, tuple) \
                else _path(value, folder)
        out[option.name] = value
    return out


def adapter_keys(preset) -> dict:
    """{Request field: value} of the adapters the preset names."""
    return {o.name: getattr(preset, o.name) for o in preset_options()
            if o.adapter and getattr(preset, o.name) not in (None, ())}


def merged_request(req, preset):
    """The request with the preset's adapter keys where the flags left them unset, and the
    fields taken from the preset."""
    taken = {k: v for k, v in adapter_keys(preset).items() if getattr(req, k) in (None, ())}
    return replace(req, **taken), set(taken)


def name_preset_key(exc: InputError, taken: set[str], preset) -> InputError:
    """An adapter error about a value from the preset, with the preset file and key in front."""
    text = str(exc)
    for option in preset_options():
        if option.name in taken and option.named in text.split(":")[0].split():
            return type(exc)(f"{preset.source}: key {option.preset!r}: {text}")
    return exc
