"""README's options table, from the same declarations `--help` prints (the commands' click
parameters as Typer builds them): `python -m linfusion_cli.cli.reference` prints it, and
tests/test_readme_tables.py fails when README.md's table differs.
"""

from __future__ import annotations
from .app import app

COMMANDS = ("generate", "upscale", "batch")


def _metavar(param, ctx) -> str:
    """ N, F, TEXT as --help shows the value's type; nothing for a flag."""
    if param.is_flag:
        return ""
    kind = str(param.display_type(ctx)).strip("<>").lower()
    return {"int": " N", "float": " F"}.get(kind, " TEXT")


def options_table() -> str:
    """One row per option (per help text): the flags, the commands that take it, its help."""
    import typer

    group = typer.main.get_command(app)
    rows: dict[tuple[str, str], list[str]] = {}
    for name in COMMANDS:
        command = group.commands[name]
        ctx = command.make_context(name, [], resilient_parsing=True)
        for param in command.params:
            if param.param_type_name != "option" or param.name == "help":
                continue
            flags = ", ".join(f"`{o}{_metavar(param, ctx)}`" for o in param.opts)
            rows.setdefault((flags, " ".join((param.help or "").split())), []).append(name)
    lines = ["| option | commands | meaning |", "|---|---|---|"]
    for (flags, help_text), commands in rows.items():
        where = "all" if len(commands) == len(COMMANDS) else ", ".join(commands)
        lines.append(f"| {flags} | {where} | {help_text.replace('|', '&#124;')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(options_table())
