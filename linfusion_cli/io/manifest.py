"""A batch's run manifest: one JSON line per finished image, so --resume knows what is really done.

The manifest lives in the output folder (`linfusion-manifest.jsonl`). Each line records the entry
index, the image path (relative to the folder), the seed actually used, the parameters that define
the image and the file's size and SHA-256. Lines are appended under an exclusive lock (fcntl.lockf,
which NFS clients honour too) with one write and an fsync, so ranks on several machines can share
one folder; a torn or damaged line (power loss, bad bytes, wrong field types) is ignored with a note.

Concurrent runs on one folder: before making entry i a process takes a byte-range lock at
CLAIM_BASE + i of the manifest (beyond its data, so appends never wait on it; the kernel drops it
when the process dies) and re-reads the manifest; an entry claimed or finished by another process
is left to it. POSIX locks belong to the process and vanish when any descriptor of the file is
closed, so one descriptor is held open for the whole run and every read and append goes through it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from ..errors import OutputError
from ..inputs import kind_of
from .image_identity import fingerprint
from .weights_id import same

MANIFEST_NAME = "linfusion-manifest.jsonl"
DATA_SPAN = 1 << 40  # the append lock covers bytes [0, DATA_SPAN); claims live above it
CLAIM_BASE = DATA_SPAN


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

    def matches(self, plan, rel_path: str, *, any_seed: bool = False) -> bool:
        """Made with these settings, this seed (any seed: the entry's was drawn), at this path."""
        return self.path == rel_path and (any_seed or self.seed == plan.seed) \
            and same(fingerprint(plan), self.params)

    def intact(self, folder: Path) -> bool:
        """The file is still the one that was recorded (not truncated, replaced or gone)."""
        path = folder / self.path
        try:
            if path.stat().st_size != self.size:
                return False
            return file_digest(path) == (self.size, self.sha256)
        except OSError:
            return False


def _record(row) -> Record:
    """A manifest row as a Record; any missing field or wrong type is a ValueError."""
    if not isinstance(row, dict):
        raise ValueError("not an object")
    ints = [row["index"], row["seed"], row["size"]] + ([row["base_seed"]] if row.get("base_seed") is not None else [])
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ints):
        raise ValueError("a number field is not a whole number")
    if not isinstance(row["path"], str) or not isinstance(row["sha256"], str) or not isinstance(row["params"], dict):
        raise ValueError("a text field has the wrong type")
    return Record(index=row["index"], path=row["path"], seed=row["seed"], base_seed=row.get("base_seed"),
                  params=row["params"], size=row["size"], sha256=row["sha256"])


def check_manifest_path(path: Path) -> None:
    """The manifest is written like an image: never through a link, never into a folder or FIFO."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(f"cannot use the batch manifest {path}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode):
        state = "a dangling symbolic link" if not path.exists() else "a symbolic link"
        raise OutputError(f"the batch manifest {path} is {state}; refusing to write through it")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"the batch manifest {path} is {kind_of(path) or 'not a regular file'}, "
                          "not a file; remove it or pick another -o")
    if not os.access(path, os.R_OK | os.W_OK):
        raise OutputError(f"the batch manifest {path} is not readable and writable")


class Manifest:
    """The records of one output folder; the latest record of an entry index wins."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST_NAME
        self.records: dict[int, Record] = {}
        self.base_seed: int | None = None  # the latest batch seed recorded
        self.ignored = 0  # damaged lines skipped by the last load
        self._fd: int | None = None  # held open while claims are held (see the module notes)
        self._claims: set[int] = set()

    # ------------------------------------------------------------ reading

    def load(self) -> "Manifest":
        """Read what earlier runs finished; a missing file is an empty manifest, damaged lines
        (torn, invalid UTF-8, wrong types) are skipped and counted in `ignored` (the CLI notes them)."""
        check_manifest_path(self.path)
        try:
            if self._fd is not None:
                data = _read_all(self._fd)
            else:
                fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise OSError(errno.EINVAL, "not a regular file")
                    data = _read_all(fd)
                finally:
                    os.close(fd)
        except FileNotFoundError:
            return self
        except OSError as exc:
            raise OutputError(f"cannot read the batch manifest {self.path}: {exc.strerror or exc}") from None
        self.records, self.ignored = {}, 0
        for raw in data.split(b"\n"):  # '\n' only: a prompt's U+2028 is not a line break
            if not raw.strip():
                continue
            try:
                record = _record(json.loads(raw.decode("utf-8")))
            except (ValueError, KeyError, TypeError, RecursionError):
                self.ignored += 1  # a torn or foreign line: its entry simply is not done
                continue
            self.records[record.index] = record
            if record.base_seed is not None:
                self.base_seed = record.base_seed
        return self

    def seed_for(self, index: int, plan) -> int | None:
        """The seed an earlier run drew for this entry, if it was made with the same settings."""
        record = self.records.get(index)
        if record is not None and same(fingerprint(plan), record.params):
            return record.seed
        return None

    def relative(self, path: Path) -> str:
        return os.path.relpath(path, self.folder)

    # ------------------------------------------------------------ claims (concurrent runs)

    def open(self) -> "Manifest":
        """Hold the manifest open (created if missing, never through a link) for claims and appends."""
        if self._fd is None:
            check_manifest_path(self.path)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK,
                             0o666)
            except OSError as exc:
                raise OutputError(f"cannot open the batch manifest {self.path}: {exc.strerror or exc}") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OutputError(f"the batch manifest {self.path} is not a regular file")
            self._fd = fd
        return self

    def close(self) -> None:
        """Release every claim and the descriptor."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self._claims = None, set()

    def claim(self, index: int) -> bool:
        """Take entry `index` for this process; False when another process holds it."""
        self.open()
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, CLAIM_BASE + index, os.SEEK_SET)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._claims.add(index)
        return True

    def release(self, index: int) -> None:
        if self._fd is not None and index in self._claims:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, CLAIM_BASE + index, os.SEEK_SET)
            self._claims.discard(index)

    def refresh(self) -> "Manifest":
        """Re-read under the append lock: records other processes finished since the start."""
        self.open()
        fcntl.lockf(self._fd, fcntl.LOCK_SH, DATA_SPAN, 0, os.SEEK_SET)
        try:
            return self.load()
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, DATA_SPAN, 0, os.SEEK_SET)

    # ------------------------------------------------------------ writing

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
        self.open()
        fd = self._fd
        fcntl.lockf(fd, fcntl.LOCK_EX, DATA_SPAN, 0, os.SEEK_SET)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            if end and os.pread(fd, 1, end - 1) != b"\n":
                data = b"\n" + data  # a torn line from a crash stays on its own line
            os.write(fd, data)
            os.fsync(fd)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, DATA_SPAN, 0, os.SEEK_SET)
        self.records[index] = record
        return record


def _read_all(fd: int) -> bytes:
    """The whole file from its start, through an open descriptor (its offset is not used)."""
    chunks, offset = [], 0
    while block := os.pread(fd, 8 << 20, offset):
        chunks.append(block)
        offset += len(block)
    return b"".join(chunks)
