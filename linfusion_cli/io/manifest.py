"""A batch's run manifest: one JSON line per finished image, so --resume knows what is really done.

The manifest lives in the output folder (`linfusion-manifest.jsonl`). Each line records the entry
index, the image path (relative to the folder), the seed actually used, the parameters that define
the image and the file's size and SHA-256. Lines are appended under an exclusive lock (fcntl.lockf,
which NFS clients honour too) with one write and an fsync, so ranks on several machines can share
one folder; a torn last line (power loss) is ignored when reading.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_NAME = "linfusion-manifest.jsonl"


def _stage_key(width, height, strength, steps, guidance, scheduler, seed_offset, method,
               demofusion) -> list:
    """One stage's defining settings, the same from a plan and from an image's record."""
    return [width, height, strength, steps, guidance, scheduler, seed_offset, method or "sdedit",
            demofusion or None]


def fingerprint(plan) -> dict[str, Any]:
    """What defines an image besides its seed: memory knobs, device and budget are left out."""
    from dataclasses import asdict

    return {
        "prompt": plan.prompt, "negative": plan.negative, "model": plan.model, "family": plan.family,
        "linfusion": plan.linfusion, "dtype": plan.dtype, "init_image": plan.init_image,
        "adapters": plan.adapters or {},
        "stages": [_stage_key(s.width, s.height, s.strength, s.steps, s.guidance, s.scheduler,
                              s.seed - plan.seed, s.method,
                              asdict(s.demofusion) if s.demofusion is not None else None)
                   for s in plan.stages],
    }


def same_settings(record: dict, plan) -> bool:
    """An image's own metadata record shows the plan's settings and seed (files without a manifest line)."""
    want = fingerprint(plan)
    del want["dtype"]  # the record holds the resolved dtype, the plan may say "auto"
    try:
        got = {key: record[key] for key in want if key not in ("stages", "adapters")}
        got["adapters"] = record.get("adapters") or {}
        got["stages"] = [_stage_key(s["width"], s["height"], s["strength"], s["steps"], s["guidance"],
                                    s["scheduler"], s["seed"] - record["seed"], s.get("method"),
                                    s.get("demofusion")) for s in record["stages"]]
    except (KeyError, TypeError):
        return False
    return got == want and record.get("seed") == plan.seed


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex) of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


@dataclass(frozen=True)
class Record:
    """One finished image as the manifest tells it."""

    index: int
    path: str  # relative to the output folder
    seed: int
    base_seed: int | None  # the batch seed the entry's seed came from (None: the entry fixed it)
    params: dict
    size: int
    sha256: str

    def matches(self, plan, rel_path: str) -> bool:
        """Made with these settings, this seed, at this path."""
        return self.path == rel_path and self.seed == plan.seed and self.params == fingerprint(plan)

    def intact(self, folder: Path) -> bool:
        """The file is still the one that was recorded (not truncated, replaced or gone)."""
        path = folder / self.path
        try:
            if path.stat().st_size != self.size:
                return False
            return file_digest(path) == (self.size, self.sha256)
        except OSError:
            return False


class Manifest:
    """The records of one output folder; the latest record of an entry index wins."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST_NAME
        self.records: dict[int, Record] = {}
        self.base_seed: int | None = None  # the latest batch seed recorded

    def load(self) -> "Manifest":
        """Read what earlier runs finished; a missing file is an empty manifest."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return self
        except (OSError, UnicodeDecodeError) as exc:
            from ..errors import OutputError

            raise OutputError(f"cannot read the batch manifest {self.path}: {exc}") from None
        for line in text.splitlines():
            try:
                row = json.loads(line)
                record = Record(index=int(row["index"]), path=str(row["path"]), seed=int(row["seed"]),
                                base_seed=row.get("base_seed"), params=row["params"],
                                size=int(row["size"]), sha256=str(row["sha256"]))
            except (ValueError, KeyError, TypeError):
                continue  # a torn or foreign line: its entry simply is not done
            self.records[record.index] = record
            if record.base_seed is not None:
                self.base_seed = int(record.base_seed)
        return self

    def seed_for(self, index: int, plan) -> int | None:
        """The seed an earlier run drew for this entry, if it was made with the same settings."""
        record = self.records.get(index)
        if record is not None and record.params == fingerprint(plan):
            return record.seed
        return None

    def relative(self, path: Path) -> str:
        return os.path.relpath(path, self.folder)

    def append(self, *, index: int, path: Path, plan, base_seed: int | None, rank: int = 0,
               world_size: int = 1) -> Record:
        """Record a finished image: hash it, then append one line atomically under a lock."""
        size, sha = file_digest(path)
        record = Record(index=index, path=self.relative(path), seed=plan.seed, base_seed=base_seed,
                        params=fingerprint(plan), size=size, sha256=sha)
        row = {"index": index, "path": record.path, "seed": plan.seed, "base_seed": base_seed,
               "params": record.params, "size": size, "sha256": sha, "rank": rank,
               "world_size": world_size, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            try:
                end = os.lseek(fd, 0, os.SEEK_END)
                if end and os.pread(fd, 1, end - 1) != b"\n":
                    data = b"\n" + data  # a torn line from a crash stays on its own line
                os.write(fd, data)
                os.fsync(fd)
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        self.records[index] = record
        return record
