"""Batch prompt files: plain lines, JSON lines and AUTOMATIC1111 `--prompt ...` lines."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .. import validate
from ..errors import InputError, PromptFileError
from ..inputs import expand, kind_of


@dataclass(frozen=True)
class PromptEntry:
    """One image to generate; None fields fall back to the command line / preset."""

    prompt: str
    negative: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    res: int | None = None
    steps: int | None = None
    guidance: float | None = None
    output: str | None = None
    source: str = ""
    line: int = 0


class _LineError(ValueError):
    """A problem with one line; parse_prompts adds the file and line number."""


def _rule(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    """A validate.py rule as a line check: the same rule and message as the flag's."""
    def convert(value: Any, key: str) -> Any:
        try:
            return check(value, key)
        except InputError as exc:
            raise _LineError(str(exc)) from None
    return convert


_text = _rule(validate.text)
_positive_int = _rule(validate.side)
_steps = _rule(validate.steps)
_guidance = _rule(validate.guidance)


def _seed(value: Any, key: str) -> int | None:
    """A seed is 0 .. 2**32-1 (validate.SEED_MAX); -1 means random, as in AUTOMATIC1111."""
    if value == -1 and not isinstance(value, bool):
        return None
    return _rule(validate.seed)(value, key)


def _from_text(word: str, key: str) -> Any:
    """Command-line words are strings; turn numbers into numbers for the type checks."""
    convert = _KEYS.get(key, ("", _text))[1]
    try:
        if convert is _guidance:
            return float(word)
        if convert in (_positive_int, _steps, _seed):
            return int(word)
    except ValueError:
        kind = "a number" if convert is _guidance else "an integer"
        raise _LineError(f"--{key} must be {kind}, got {word!r}") from None
    return word


# key (as written in a file) -> (PromptEntry field, converter)
_KEYS: dict[str, tuple[str, Callable[[Any, str], Any]]] = {
    "prompt": ("prompt", _text),
    "negative": ("negative", _text),
    "negative_prompt": ("negative", _text),
    "seed": ("seed", _seed),
    "res": ("res", _positive_int),
    "width": ("width", _positive_int),
    "height": ("height", _positive_int),
    "steps": ("steps", _steps),
    "guidance": ("guidance", _guidance),
    "cfg_scale": ("guidance", _guidance),
    "output": ("output", _text),
}


def _entry(pairs: list[tuple[str, Any]], spell: Callable[[str], str], what: str) -> dict[str, Any]:
    """Convert (key, value) pairs to PromptEntry fields, refusing unknown and repeated keys."""
    fields: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for key, value in pairs:
        if key not in _KEYS:
            raise _LineError(f"unknown {what} {spell(key)}; use {', '.join(map(spell, _KEYS))}")
        field, convert = _KEYS[key]
        if field in seen:
            raise _LineError(f"{spell(key)} given twice (also as {spell(seen[field])})")
        seen[field] = key
        if value is not None or field == "prompt":
            fields[field] = convert(value, spell(key))
    if not fields.get("prompt", "").strip():
        raise _LineError(f"missing or empty {spell('prompt')}")
    return fields


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (json.loads would keep the last silently)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _LineError(f"key {key!r} given twice")
        seen.add(key)
    return dict(pairs)


def _parse_json(line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line, object_pairs_hook=_no_repeats)
    except _LineError:
        raise
    except ValueError as exc:
        raise _LineError(f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _LineError("a JSON line must be an object")
    return _entry(list(obj.items()), repr, "key")


def _parse_a1111(line: str) -> dict[str, Any]:
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise _LineError(f"bad quoting: {exc}") from None
    pairs = []
    for i in range(0, len(words), 2):
        option = words[i]
        if not option.startswith("--"):
            raise _LineError(f"expected an option like --prompt, got {option!r}")
        if i + 1 >= len(words) or words[i + 1].startswith("--"):
            raise _LineError(f"{option} needs a value")
        pairs.append((option[2:], _from_text(words[i + 1], option[2:])))
    return _entry(pairs, lambda key: f"--{key}", "option")


def _parse_line(text: str) -> dict[str, Any] | None:
    """Fields for one line, or None for blanks and comments."""
    stripped = text.strip()
    if not stripped or stripped.startswith("#"):
        return None
    if stripped.startswith("{"):
        return _parse_json(stripped)
    if stripped.startswith("--"):
        return _parse_a1111(stripped)
    return {"prompt": stripped}


def split_lines(text: str) -> list[str]:
    """Lines split on '\\n' only (a trailing '\\r' dropped): U+2028, U+0085 or a form feed inside
    a prompt stay in it, as every editor and `wc -l` count lines."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def parse_prompts(text: str, source: str) -> list[PromptEntry]:
    """Parse a whole file up front, so a typo on line 90 fails before image 1 is generated."""
    entries: list[PromptEntry] = []
    errors: list[str] = []
    for number, line in enumerate(split_lines(text), start=1):
        try:
            fields = _parse_line(line)
        except _LineError as exc:
            errors.append(f"{source}:{number}: {exc}")
            continue
        if fields is not None:
            entries.append(PromptEntry(**fields, source=source, line=number))
    if errors:
        rest = len(errors) - 1
        more = f" (and {rest} more error{'s' if rest > 1 else ''})" if rest else ""
        raise PromptFileError(errors[0] + more)
    return entries


def read_prompt_file(path_or_dash: str, stdin: TextIO | None = None) -> list[PromptEntry]:
    """Read prompts from a file or '-' (stdin); a file without prompts is an error."""
    if path_or_dash == "-":
        source = "<stdin>"
        try:
            text = (stdin if stdin is not None else sys.stdin).read()
        except UnicodeDecodeError:
            raise PromptFileError(f"{source}: not UTF-8 text") from None
        text = text.removeprefix("\ufeff")  # a BOM, as utf-8-sig drops it from files
    else:
        source = path_or_dash
        path = Path(expand(path_or_dash))
        kind = kind_of(path)
        if kind == "missing":
            raise InputError(f"prompt file not found: {path}")
        if kind is not None and kind != "a FIFO":  # a pipe (<(cmd), a named FIFO) is read like stdin
            raise InputError(f"prompt file {path} is {kind}, not a file of prompts")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise PromptFileError(f"{path}: not UTF-8 text") from None
        except OSError as exc:
            raise InputError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None
    entries = parse_prompts(text, source)
    if not entries:
        raise PromptFileError(f"{source}: no prompts (only blank lines or comments)")
    return entries
