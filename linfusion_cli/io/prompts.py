"""Batch prompt files: plain lines, JSON lines and AUTOMATIC1111 `--prompt ...` lines."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import field, make_dataclass
from pathlib import Path
from typing import Any, Optional, TextIO

from .. import validate
from ..errors import InputError, PromptFileError
from ..inputs import expand, kind_of
from ..schema import line_options


# One image to generate: the prompt, each option a batch line may set (schema.OPTIONS' `line`
# keys; None falls back to the command line / preset), its output and where it was read.
PromptEntry = make_dataclass(
    "PromptEntry", [(o.name, o.type, field(default=o.default)) for o in line_options()]
    + [("output", Optional[str], field(default=None)), ("source", str, field(default="")),
       ("line", int, field(default=0))],
    frozen=True, namespace={"__doc__": "One image to generate; None fields fall back to the command line."})
PromptEntry.__module__ = __name__


class _LineError(ValueError):
    """A problem with one line; parse_prompts adds the file and line number."""


def _output(value: Any, key: str) -> str:
    """An entry's own output path (kept inside -o by the batch command)."""
    return validate.text(value, key)


# key (as written in a file: a JSON key, or an A1111 `--key`) -> (PromptEntry field, its check)
_KEYS: dict[str, tuple[str, Callable[[Any, str], Any]]] = {
    **{key: (o.name, o.rule) for o in line_options() for key in o.line}, "output": ("output", _output)}
_PARSE = {o.name: o.parse for o in line_options() if o.parse}
_KINDS = {o.name: o.kind for o in line_options()}


def _checked(key: str, value: Any, spelled: str) -> Any:
    """A line's value under its option's rule: the same rule and message as the flag's."""
    name, check = _KEYS[key]
    try:
        if name in _PARSE:
            value = _PARSE[name](value, spelled)
        return None if value is None and name != "prompt" else check(value, spelled)
    except InputError as exc:
        raise _LineError(str(exc)) from None


def _from_text(word: str, key: str) -> Any:
    """Command-line words are strings; turn numbers into numbers for the type checks."""
    kind = _KINDS.get(_KEYS.get(key, ("",))[0], str)
    try:
        if kind is float:
            return float(word)
        if kind is int:
            return int(word)
    except ValueError:
        kind_text = "a number" if kind is float else "an integer"
        raise _LineError(f"--{key} must be {kind_text}, got {word!r}") from None
    return word


def _entry(pairs: list[tuple[str, Any]], spell: Callable[[str], str], what: str) -> dict[str, Any]:
    """Convert (key, value) pairs to PromptEntry fields, refusing unknown and repeated keys."""
    fields: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for key, value in pairs:
        if key not in _KEYS:
            raise _LineError(f"unknown {what} {spell(key)}; use {', '.join(map(spell, _KEYS))}")
        name = _KEYS[key][0]
        if name in seen:
            raise _LineError(f"{spell(key)} given twice (also as {spell(seen[name])})")
        seen[name] = key
        if value is not None or name == "prompt":
            fields[name] = _checked(key, value, spell(key))
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


def read_prompt_argument(prompt: str | None, stdin) -> str:
    """PROMPT, or `stdin`'s text when PROMPT is '-' or absent and stdin is piped."""
    piped = stdin is not None and not isatty(stdin)
    if prompt == "-" or (prompt is None and piped):
        if stdin is None:
            raise InputError("no prompt on stdin (stdin is closed)")
        try:
            text = stdin.read().strip()
        except UnicodeDecodeError:
            raise InputError("the prompt on stdin is not UTF-8 text") from None
        except (OSError, ValueError):  # a closed stdin
            raise InputError("no prompt on stdin (stdin is closed)") from None
        if not text:
            raise InputError("no prompt on stdin")
        return text
    if prompt is None:
        raise InputError("no prompt given (pass PROMPT, or - to read it from stdin)")
    return prompt


def isatty(stream) -> bool:
    """The stream is a terminal (False for a closed or odd one)."""
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False
