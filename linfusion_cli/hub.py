"""How to tell a user to download a hub repo with the huggingface_hub that is installed.

huggingface_hub ships the `hf` command since 0.34 and dropped `huggingface-cli` in 1.0, so a
refusal names the command the installed version has (read from its entry points), or the
Python call when it has neither.
"""

from __future__ import annotations

from importlib import metadata


def hub_commands() -> set[str]:
    """The console scripts the installed huggingface_hub declares."""
    try:
        return {ep.name for ep in metadata.distribution("huggingface_hub").entry_points
                if ep.group == "console_scripts"}
    except metadata.PackageNotFoundError:  # pragma: no cover - a dependency of this package
        return set()


def download_command(repo_id: str, include: tuple[str, ...] = ()) -> str:
    """A command that downloads repo_id (only the `include` patterns, when given)."""
    commands = hub_commands()
    for name in ("hf", "huggingface-cli"):
        if name in commands:
            patterns = "".join(f" '{p}'" for p in include)
            return f"{name} download {repo_id}" + (f" --include{patterns}" if include else "")
    allow = f", allow_patterns={list(include)!r}" if include else ""
    return (f"python -c \"import huggingface_hub; "
            f"huggingface_hub.snapshot_download('{repo_id}'{allow})\"")
