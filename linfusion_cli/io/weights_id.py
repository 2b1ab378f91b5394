"""Which weights made an image: resume and the batch manifest must not mix stages of other weights.

A local file or folder is identified by the size and modification time (ns) of each weight file
in it, not by a digest of the bytes: hashing a multi-GB model on every run and every resume
would take longer than some stages, and replacing or rewriting a file in place changes its
mtime. A hub id is identified by the commit of the snapshot the cache resolves it to. LoRAs are
already recorded with their content hash (adapters.file_checks.short_hash).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# the files whose change changes the weights a folder loads (configs included: they shape them)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json")
ROLES = {"model": "model", "linfusion": "LinFusion", "controlnet": "ControlNet",
         "tile_controlnet": "tile ControlNet", "ip_adapter": "IP-Adapter",
         "ip_adapter_encoder": "IP-Adapter image encoder"}


def sources(plan) -> dict[str, str]:
    """{role: source as given} for every set of weights the plan loads but LoRAs (hashed already)."""
    out = {"model": plan.model}
    if plan.linfusion not in (None, "fresh"):
        out["linfusion"] = plan.linfusion
    adapters = plan.adapters
    for kind in ("controlnet", "tile_controlnet", "ip_adapter"):
        spec = getattr(adapters, kind, None)
        if spec is not None:
            out[kind] = spec.source
    ip = getattr(adapters, "ip_adapter", None)
    if ip is not None and ip.encoder:
        out["ip_adapter_encoder"] = ip.encoder
    return out


def identity(plan) -> dict[str, str | None]:
    """{role: a short fingerprint of the weights now} (None: a built-in demo model or unknown)."""
    return {role: of_source(source) for role, source in sources(plan).items()}


def of_source(source: str) -> str | None:
    """'files:<digest>' of a local file or folder, 'hub:<commit>' of a cached hub id, else None."""
    if source.startswith("demo"):
        return None
    path = Path(source).expanduser()
    if path.exists():
        return "files:" + _stat_digest(path)
    if source.count("/") >= 1 and not source.startswith((".", "/", "~")):
        commit = hub_revision("/".join(source.split("/")[:2]))
        return f"hub:{commit}" if commit else "hub:not cached"
    return None


def _stat_digest(path: Path) -> str:
    """SHA-256 (16 hex) of (relative path, size, mtime_ns) of each weight file under `path`."""
    lines = []
    if path.is_file():
        st = path.stat()
        lines.append(f"{path.name} {st.st_size} {st.st_mtime_ns}")
    else:
        for folder, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.endswith(WEIGHT_SUFFIXES) and not name.startswith("."):
                    full = Path(folder) / name
                    try:
                        st = full.stat()
                    except OSError:
                        continue
                    lines.append(f"{full.relative_to(path)} {st.st_size} {st.st_mtime_ns}")
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def hub_revision(repo: str, revision: str = "main") -> str | None:
    """The commit the local hub cache resolves `repo` to (refs/<revision>), or None if not cached."""
    from huggingface_hub import constants  # late: huggingface_hub is slow to import

    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / revision
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


def changed(want: dict, got) -> list[str]:
    """Readable names of the weights whose fingerprint differs ('the model weights')."""
    got = got if isinstance(got, dict) else {}
    return [f"the {ROLES.get(role, role)} weights (changed on disk since)" for role in sorted(set(want) | set(got))
            if want.get(role) != got.get(role)]


def same(want: dict, recorded) -> bool:
    """`recorded` (a checkpoint's settings, a manifest line's params, an image's record) shows
    what `want` defines. Files written before weights were recorded carry no `weights`: they are
    trusted as they were then (by path), so a run interrupted before an upgrade still resumes."""
    if not isinstance(recorded, dict):
        return False
    if "weights" not in recorded:
        want = {k: v for k, v in want.items() if k != "weights"}
    return want == recorded
