"""Where exact mode's paused tiles wait: on the device while they fit its budget, else in host RAM.

In exact mode every tile pauses at every GroupNorm until all tiles have offered their moments.
A `Lot` (one per tiled pass) decides at each pause: the tile's tensors stay on the device if the
tensors already paused there plus these fit `budget` bytes; otherwise they are copied into the
tile's own host buffer (pinned where CUDA is, allocated at the tile's first park and sized for
its largest GroupNorm, vae/working_set.py, then reused every round) and copied back when the
tile resumes. So the device never holds more than `budget` bytes of paused tensors, and only
what does not fit crosses PCIe. torch's pinned allocator rounds every block up to a power of two
(up to 2x the bytes asked for), so buffers are pinned only while their rounded sizes fit
`pin_limit` (the host budget exact mode was chosen under); beyond, they are pageable (exact size,
copies that block the host).

Copies go through runtime.transfer (counted) and do not block the host. On CUDA they run on two
side streams, out and in, so a tile's copy out overlaps the next tile's copy in and its compute;
events order them: a buffer is read (copy in) only after its copy out is done, and overwritten
(the next copy out) only after its last copy in is done; the compute stream waits for a copy in
before it reads the tensors. Elsewhere (CPU, meta) the same calls run in order: no streams, and
every wait is a no-op.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..runtime import transfer

_ALIGN = 64  # bytes: each tensor's place in a host buffer starts on this boundary


# ---------------------------------------------------------------- streams (CUDA) or nothing
def side_stream(device: torch.device):
    """A CUDA stream beside the compute stream for copies; None off CUDA (copies run in order)."""
    return torch.cuda.Stream(device=device) if device.type == "cuda" else None


def on_stream(stream):
    """Work queued inside runs on `stream` (CUDA); a no-op context without one."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def mark(stream):
    """An event recorded on `stream` now (None without one)."""
    return stream.record_event() if stream is not None else None


def wait(stream, event) -> None:
    """`stream` runs nothing queued after this before `event` has happened (no-op without)."""
    if stream is not None and event is not None:
        stream.wait_event(event)


def current(device: torch.device):
    """The compute stream of a CUDA device, None elsewhere."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


# ---------------------------------------------------------------- host buffers
def nbytes(t: torch.Tensor) -> int:
    """Bytes of a dense tensor."""
    return t.numel() * t.element_size()


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t itself when its elements fill its storage span in some order (contiguous or
    channels-last), else a contiguous copy (on its device: no transfer)."""
    if t.is_contiguous() or (t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t
    return t.contiguous()


def _places(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    """Byte offsets of the tensors laid end to end (aligned) in one buffer, and its size."""
    offsets, at = [], 0
    for t in tensors:
        offsets.append(at)
        at += -(-nbytes(t) // _ALIGN) * _ALIGN
    return offsets, at


def pinned_size(n: int) -> int:
    """Host bytes torch's pinned (caching host) allocator takes for an n-byte buffer."""
    return 1 << max(0, n - 1).bit_length()


def _view(buf: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A view of the byte buffer `buf` at `offset` with like's dtype, shape and strides."""
    flat = buf[offset:offset + nbytes(like)].view(like.dtype)  # (numel,)
    return flat.as_strided(like.shape, like.stride())


class Lot:
    """Paused tiles' tensors for one tiled pass: see the module docstring.

    `capacity(key)`: bytes the tile `key` holds at its largest GroupNorm (its host buffer's
    size; a buffer found short is replaced by a larger one). `pin_limit`: host bytes the pinned
    buffers may take, rounded as torch's allocator rounds them (None: no limit). `moved`: bytes
    copied out so far, the same as copied back once every tile has resumed.
    """

    def __init__(self, device: torch.device, budget: int, capacity: Callable[[int], int],
                 pin_limit: int | None = None):
        self.device, self.budget, self.capacity = torch.device(device), budget, capacity
        self.pin_limit = pin_limit
        self.pinned = 0  # host bytes of pinned buffers, as allocated (rounded)
        self.held = 0  # bytes of paused tensors left on the device
        self.moved = 0
        self._resident: dict[int, int] = {}  # tile -> bytes it left on the device
        self._parked: set[int] = set()
        self._buffers: dict[int, torch.Tensor] = {}  # tile -> host byte buffer
        self._written: dict[int, object] = {}  # tile -> event: its copy out is done
        self._read: dict[int, object] = {}  # tile -> event: its last copy in is done
        self._out, self._in = side_stream(self.device), side_stream(self.device)

    def pause(self, key: int, t: dict[str, torch.Tensor]) -> None:
        """Tile `key` pauses holding `t`: left on the device if it fits, else parked (t's values
        replaced, in place, by views of the tile's host buffer)."""
        size = sum(map(nbytes, t.values()))
        if self.held + size <= self.budget:
            self.held += size
            self._resident[key] = size
            return
        self._park(key, t, size)

    def resume(self, key: int, t: dict[str, torch.Tensor]) -> None:
        """Tile `key` resumes: its tensors back on the device (in place in t)."""
        if key in self._resident:
            self.held -= self._resident.pop(key)
            return
        self._parked.discard(key)
        views = dict(t)
        home = {k: torch.empty_like(v, device=self.device) for k, v in views.items()}  # compute stream
        wait(self._in, self._written.get(key))  # the copy out into this buffer is done
        if self._in is not None:
            self._in.wait_stream(current(self.device))  # earlier users of home's memory are done
        with on_stream(self._in):
            for k, v in views.items():
                t[k] = transfer.to_device(v, self.device, out=home[k], non_blocking=True)
        self._read[key] = mark(self._in)
        wait(current(self.device), self._read[key])  # the tile reads them only once they are in

    def _park(self, key: int, t: dict[str, torch.Tensor], size: int) -> None:
        """Copy t's tensors into the tile's host buffer, out of the compute stream's way."""
        dense = {k: _dense(v) for k, v in t.items()}
        offsets, need = _places(list(dense.values()))
        buf = self._buffer(key, need)
        if self._out is not None:
            self._out.wait_stream(current(self.device))  # the tensors are computed
        wait(self._out, self._read.get(key))  # the last copy in from this buffer is done
        with on_stream(self._out):
            for (k, v), at in zip(dense.items(), offsets):
                t[k] = transfer.to_host(v, out=_view(buf, at, v), non_blocking=True)
                if self._out is not None:
                    v.record_stream(self._out)  # its memory is not reused before the copy is done
        self._written[key] = mark(self._out)
        self._parked.add(key)
        self.moved += size

    def _buffer(self, key: int, need: int) -> torch.Tensor:
        """The tile's host byte buffer, allocated once (larger only if `capacity` fell short)."""
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < need:
            if buf is not None:  # copies still reading the old one finish first
                self.settle()
            size = max(need, self.capacity(key) + 2 * _ALIGN)
            pin = self.pin_limit is None or self.pinned + pinned_size(size) <= self.pin_limit
            self.pinned += pinned_size(size) if pin else 0
            like = torch.empty(0, device="meta") if self.device.type == "meta" else None
            buf = transfer.host_buffer((size,), torch.uint8, like=like, pinned=pin)
            self._buffers[key] = buf
        return buf

    def settle(self) -> None:
        """Wait (host) until every copy queued so far is done: before buffers are freed."""
        for event in list(self._written.values()) + list(self._read.values()):
            if event is not None:
                event.synchronize()

    def close(self) -> None:
        """End of the pass: every copy done, host buffers released."""
        if self._parked:
            raise RuntimeError(f"{len(self._parked)} tiles still parked at the end of the pass")
        self.settle()
        self._buffers.clear()
