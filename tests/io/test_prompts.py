"""Batch prompt files: every syntax, and errors that point at the file and line."""

from __future__ import annotations

import dataclasses
import io

import pytest

from linfusion_cli.errors import InputError, PromptFileError
from linfusion_cli.io.prompts import PromptEntry, parse_prompts, read_prompt_file


def test_plain_lines_comments_and_blanks():
    text = "# my prompts\n\n  a red fox, snow: winter  \n   # indented comment\nan owl\n"
    entries = parse_prompts(text, "p.txt")
    assert entries == [
        PromptEntry(prompt="a red fox, snow: winter", source="p.txt", line=3),
        PromptEntry(prompt="an owl", source="p.txt", line=5),
    ]


def test_entry_is_frozen_with_expected_fields():
    names = [f.name for f in dataclasses.fields(PromptEntry)]
    assert names[0] == "prompt" and sorted(names) == sorted([  # in schema.OPTIONS' order
        "prompt", "negative", "seed", "width", "height", "res",
        "steps", "guidance", "output", "source", "line",
    ])  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        PromptEntry("x").seed = 3


def test_json_lines_with_aliases():
    text = (
        '{"prompt": "a cat", "negative": "blurry", "seed": 0, "res": 2048, "steps": 30,'
        ' "guidance": 6, "output": "cat.png"}\n'
        '{"prompt": "a dog", "negative_prompt": "ugly", "cfg_scale": 7.5, "width": 1024,'
        ' "height": 512, "seed": null}\n'
    )
    first, second = parse_prompts(text, "p.jsonl")
    assert first == PromptEntry(
        prompt="a cat", negative="blurry", seed=0, res=2048, steps=30, guidance=6.0,
        output="cat.png", source="p.jsonl", line=1,
    )  # fmt: skip
    assert isinstance(first.guidance, float)
    assert second == PromptEntry(
        prompt="a dog", negative="ugly", guidance=7.5, width=1024, height=512,
        source="p.jsonl", line=2,
    )  # fmt: skip


def test_a1111_lines():
    line = (
        '--prompt "a castle, at dusk" --negative_prompt "low quality" --seed 42 --steps 20'
        " --cfg_scale 6.5 --width 1536 --height 768"
    )
    (entry,) = parse_prompts(line, "a.txt")
    assert entry == PromptEntry(
        prompt="a castle, at dusk", negative="low quality", seed=42, steps=20, guidance=6.5,
        width=1536, height=768, source="a.txt", line=1,
    )  # fmt: skip
    (random,) = parse_prompts("--prompt 'x' --seed -1", "a.txt")
    assert random.seed is None


def test_mixed_syntaxes_keep_line_numbers():
    text = 'plain\n\n{"prompt": "json"}\n# c\n--prompt a1111\n'
    assert [(e.prompt, e.line) for e in parse_prompts(text, "m")] == [
        ("plain", 1),
        ("json", 3),
        ("a1111", 5),
    ]


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ('{"prompt": "x", "sampler": "ddim"}', "unknown key 'sampler'"),
        ('{"negative": "x"}', "missing or empty 'prompt'"),
        ('{"prompt": ""}', "missing or empty 'prompt'"),
        ('{"prompt": 3}', "'prompt' must be a string"),
        ('{"prompt": "x", "steps": "20"}', "'steps' must be an integer"),
        ('{"prompt": "x", "steps": 2.5}', "'steps' must be an integer"),
        ('{"prompt": "x", "width": -8}', "'width' must be in [8, 32768], got -8"),
        ('{"prompt": "x", "seed": true}', "'seed' must be an integer"),
        ('{"prompt": "x", "seed": -5}', "'seed' must be -1 (random) or in [0, 4294967295]"),
        ('{"prompt": "x", "guidance": "high"}', "'guidance' must be a number"),
        ('{"prompt": "x", "cfg_scale": -1}', "'cfg_scale' must be in [0, 100], got -1"),
        ('{"prompt": "x", "negative": "a", "negative_prompt": "b"}', "given twice"),
        ('{"prompt": "x",}', "invalid JSON"),
        ('{"prompt": "x"} trailing', "invalid JSON"),
        ("--prompt x --sampler_name DDIM", "unknown option --sampler_name"),
        ('--prompt "unclosed', "bad quoting"),
        ("--prompt x --steps", "--steps needs a value"),
        ("--prompt x --steps many", "--steps must be an integer"),
        ("--prompt x --cfg_scale lots", "--cfg_scale must be a number"),
        ("--prompt x --height 0", "--height must be in [8, 32768], got 0"),
        ("--prompt x stray", "expected an option"),
        ("--seed 3", "missing or empty --prompt"),
        ("--prompt a --prompt b", "given twice"),
    ],
)
def test_errors_name_file_and_line(line, what):
    text = f"# header\nfine prompt\n\n{line}\n"
    with pytest.raises(PromptFileError) as info:
        parse_prompts(text, "batch.txt")
    message = str(info.value)
    assert message.startswith("batch.txt:4: ")
    assert what in message
    assert "\n" not in message


def test_whole_file_checked_first_error_first():
    text = "ok\n--prompt x --bogus 1\nok too\n{bad\n"
    with pytest.raises(
        PromptFileError, match=r"^b:2: unknown option --bogus.*\(and 1 more error\)$"
    ):
        parse_prompts(text, "b")


def test_read_file_and_stdin(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\ufeffa cat\n# skip\n--prompt dog --seed 5\n", encoding="utf-8")
    entries = read_prompt_file(str(path))
    assert [(e.prompt, e.seed, e.source, e.line) for e in entries] == [
        ("a cat", None, str(path), 1),
        ("dog", 5, str(path), 3),
    ]
    (entry,) = read_prompt_file("-", stdin=io.StringIO('{"prompt": "from stdin"}\n'))
    assert entry == PromptEntry(prompt="from stdin", source="<stdin>", line=1)


def test_read_errors(tmp_path):
    with pytest.raises(InputError, match="not found: .*missing.txt"):
        read_prompt_file(str(tmp_path / "missing.txt"))
    with pytest.raises(InputError, match="directory"):
        read_prompt_file(str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(PromptFileError, match="empty.txt: no prompts"):
        read_prompt_file(str(empty))
    with pytest.raises(PromptFileError, match="<stdin>: no prompts"):
        read_prompt_file("-", stdin=io.StringIO(""))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(PromptFileError, match="bin.txt: not UTF-8"):
        read_prompt_file(str(binary))
    with pytest.raises(PromptFileError, match=r"bad.txt:1: "):
        bad = tmp_path / "bad.txt"
        bad.write_text('{"prompt": 1}\n')
        read_prompt_file(str(bad))
