"""Parked maps' copies across PCIe, staged: pinned host buffers a pool hands out again every
forward, copies that do not block the host, and the next band's rows on their way while the
current band computes.

A parked map (B, C, H, W) lives row-major on the host, (H, B, C, W), so the rows of any band
(with its conv halo) are one contiguous piece: one copy each way. Copies run on two side
streams (to the host, to the device), each followed by an event: no band is read before the
event of the copy that wrote it, no copy writes a buffer before the events of the copies that
last used it, and the compute stream waits for a fetch's event before it reads the rows.
`Parked.prefetch` issues a fetch that a later `rows` with the same range picks up, so the
caller asks for the next band's rows before it computes the current one.

Pinned memory comes from torch's pinned allocator, which rounds every allocation up to a power
of two (a 5.4 GB skip would take 8.6 GB): the pool carves its buffers out of chunks whose size
already is one, so the host holds the skips plus less than a chunk.

Without CUDA (the CPU, the memory trace's meta device) the same code runs with stand-ins:
no streams (copies run in order) and events that are complete when recorded; those append what
they were asked to an optional log, which the tests read to check the order above.
"""

from __future__ import annotations

import contextlib
import math

import torch

from . import skip_parking, transfer  # skip_parking.host_buffer is swapped by the memory trace: per call

_ALIGN = 512  # bytes: each buffer carved out of a chunk starts on this boundary
CHUNK_BYTES = 1 << 28  # pinned chunks the pool carves (a power of two: not rounded up)


class HostEvent:
    """torch.cuda.Event's stand-in without CUDA: the copy it follows is done when it returns.
    `log` (a list, or None) gets ("record" | "wait", tag) for every call."""

    def __init__(self, tag: tuple, log: list | None):
        self.tag, self.log = tag, log

    def _note(self, what: str) -> None:
        if self.log is not None:
            self.log.append((what, self.tag))

    def record(self, stream=None) -> None:
        self._note("record")

    def wait(self, stream=None) -> None:
        self._note("wait")

    def synchronize(self) -> None:
        self._note("wait")

    def query(self) -> bool:
        return True


class Lanes:
    """A device's two side streams for copies (`out` to the host, `into` the device) and its
    events; None streams and HostEvents where the device is not a CUDA one."""

    def __init__(self, device: torch.device, log: list | None):
        self.device, self.log = device, log
        cuda = device.type == "cuda"
        self.out = torch.cuda.Stream(device=device) if cuda else None
        self.into = torch.cuda.Stream(device=device) if cuda else None

    def on(self, stream):
        """Work queued inside the block runs on `stream` (in order without one)."""
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def after_compute(self, stream) -> None:
        """`stream` runs its next work only after what the compute stream has queued so far."""
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))

    def event(self, tag: tuple):
        """An event to record after a copy (`tag` names the copy in the stand-in's log)."""
        return torch.cuda.Event() if self.out is not None else HostEvent(tag, self.log)

    def wait(self, event, stream=None) -> None:
        """`stream` (the compute stream when None) runs nothing queued later before `event`."""
        if self.out is None:
            event.wait()
        else:
            stream = stream if stream is not None else torch.cuda.current_stream(self.device)
            stream.wait_event(event)


class Parked:
    """A (B, C, H, W) map in host memory laid out (H, B, C, W), in one block of rows or more
    (`blocks`: (first row, end row, (rows, B, C, W) host tensor)).

    put(a, band) copies a device band in; prefetch(lo, hi) starts copying rows [lo, hi) back;
    rows(lo, hi) returns them on the device (B, C, hi - lo, W) (a view of a (rows, B, C, W)
    tensor), from the prefetch when it matches, else fetched now by the same code.
    """

    def __init__(self, blocks: list, lanes: Lanes, events: list, log: list | None):
        self.blocks, self.lanes, self.log = blocks, lanes, log
        self.events = events  # every copy into or out of the blocks: the next user waits on them
        self.key = blocks[0][2].data_ptr()  # names the buffer in the log
        self.height = blocks[-1][1]
        _, self.batch, self.channels, self.width = blocks[0][2].shape
        self.dtype = blocks[0][2].dtype
        self.written: list = []  # (a, b, event) of every put
        self.ahead = None  # (lo, hi, (hi - lo, B, C, W) device tensor, event): not yet read

    @property
    def view(self) -> torch.Tensor:
        """The map as a (B, C, H, W) host tensor (a view; one block only)."""
        assert len(self.blocks) == 1, "a map carved in several blocks has no single view"
        return self.blocks[0][2].permute(1, 2, 0, 3)

    def _pieces(self, lo: int, hi: int):
        """(p, q, host rows [p, q)) for each block that rows [lo, hi) fall in."""
        for r0, r1, block in self.blocks:
            p, q = max(lo, r0), min(hi, r1)
            if p < q:
                yield p, q, block[p - r0:q - r0]

    def _note(self, *entry) -> None:
        if self.log is not None:
            self.log.append((entry[0], self.key, *entry[1:]))

    def put(self, a: int, band: torch.Tensor) -> None:
        """Rows [a, a + h) of the map from a device band (B, C, h, W), copied without blocking."""
        b = a + band.shape[2]
        rows = band.permute(2, 0, 1, 3).contiguous()  # (h, B, C, W), made on the compute stream
        stream = self.lanes.out
        self.lanes.after_compute(stream)  # the band is computed before it is copied
        event = self.lanes.event(("d2h", self.key, a, b))
        with self.lanes.on(stream):
            for p, q, dst in self._pieces(a, b):
                self._note("copy d2h", p, q)
                transfer.to_host(rows[p - a:q - a], out=dst, non_blocking=True)
            event.record(stream)
        if stream is not None:
            rows.record_stream(stream)  # its memory is not reused before the copy has run
        self.written.append((a, b, event))
        self.events.append(event)

    def prefetch(self, lo: int, hi: int) -> None:
        """Start copying rows [lo, hi) to the device; `rows(lo, hi)` picks them up."""
        if self.ahead is not None:
            self._take()  # an unread fetch: its copy is done before its memory can go
        device = self.lanes.device
        out = torch.empty(max(0, hi - lo), self.batch, self.channels, self.width, dtype=self.dtype,
                          device=device)  # (hi - lo, B, C, W), on the compute stream
        stream = self.lanes.into
        self.lanes.after_compute(stream)  # earlier users of out's memory are done with it
        for a, b, written in self.written:
            if a < hi and b > lo:
                self.lanes.wait(written, stream)  # the rows are on the host before they are read
        event = self.lanes.event(("h2d", self.key, lo, hi))
        with self.lanes.on(stream):
            for p, q, src in self._pieces(lo, hi):
                self._note("copy h2d", p, q)
                transfer.to_device(src, device, out=out[p - lo:q - lo], non_blocking=True)
            event.record(stream)
        self.events.append(event)
        self.ahead = (lo, hi, out, event)

    def _take(self) -> torch.Tensor:
        """The prefetched rows (hi - lo, B, C, W), once the compute stream has waited for them."""
        lo, hi, out, event = self.ahead
        self.ahead = None
        self.lanes.wait(event)
        self._note("use", lo, hi)
        return out

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of the map on the device, (B, C, hi - lo, W)."""
        if self.ahead is None or self.ahead[:2] != (lo, hi):
            self.prefetch(lo, hi)
        return self._take().permute(1, 2, 0, 3)

    def settle(self) -> None:
        """The host waits for every copy into the map (before host code reads it)."""
        for _, _, event in self.written:
            event.synchronize()


class _Slot:
    """A pooled buffer: its blocks, the events of the copies that last used them, and whether
    this forward has it."""

    def __init__(self, blocks: list):
        self.blocks, self.events, self.taken = blocks, [], False


class _Arena:
    """Host memory carved out of pinned chunks of a power-of-two size, whole rows at a time."""

    def __init__(self, chunk_bytes: int):
        self.chunk_bytes = chunk_bytes
        self.chunks: list[torch.Tensor] = []  # (bytes,) uint8 host tensors
        self.used = 0  # bytes taken from the last chunk

    def carve(self, shape: tuple, dtype: torch.dtype, like: torch.Tensor | None) -> list:
        """Blocks [(r0, r1, (r1 - r0, B, C, W) tensor)] covering the rows of an (H, B, C, W) map
        (meta chunks when `like` is meta; it is not kept: it is often the map itself)."""
        height, rest = shape[0], tuple(shape[1:])
        row = math.prod(rest) * dtype.itemsize
        blocks, r = [], 0
        while r < height:
            room = (self.chunks[-1].numel() - self.used) // row if self.chunks else 0
            if room <= 0:  # a new chunk: a power of two, at least one row
                size = max(self.chunk_bytes, 1 << (row - 1).bit_length())
                self.chunks.append(skip_parking.host_buffer((size,), torch.uint8, like=like))
                self.used = 0
                continue
            n = min(height - r, room)
            flat = self.chunks[-1][self.used:self.used + n * row].view(dtype)
            blocks.append((r, r + n, flat.view(n, *rest)))
            self.used = -(-(self.used + n * row) // _ALIGN) * _ALIGN
            r += n
        return blocks


class Staging:
    """Host buffers for parked maps and the side streams their copies run on, for as long as
    its owner keeps it (one per apply of the skips_on_cpu knob, handed to each forward).

    pooled: buffers are handed out per forward (`begin` frees them all: the maps of one forward
    must not outlive the next) and carved from pinned chunks that stay. Not pooled, for maps
    that leave the forward (a ControlNet's residuals): a fresh pageable buffer each, freed with
    the map (`view` gives it as one tensor).
    """

    def __init__(self, pooled: bool = True, chunk_bytes: int = CHUNK_BYTES,
                 log: list | None = None):
        assert chunk_bytes & (chunk_bytes - 1) == 0, "chunks are a power of two"
        self.pooled, self.chunk_bytes, self.log = pooled, chunk_bytes, log
        self._slots: dict[tuple, list[_Slot]] = {}
        self._arenas: dict[bool, _Arena] = {}  # meta or not
        self._lanes: dict[torch.device, Lanes] = {}
        self._parked: list[Parked] = []  # handed out this forward

    def lanes(self, device) -> Lanes:
        """The device's side streams, made once (streams are per device)."""
        device = torch.device(device)
        if device not in self._lanes:
            self._lanes[device] = Lanes(device, self.log)
        return self._lanes[device]

    def begin(self) -> None:
        """A new forward: every pooled buffer is free again (the copies that last used one are
        waited on before any copy writes it)."""
        for slots in self._slots.values():
            for slot in slots:
                slot.taken = False
        self._parked = []
        if self.log is not None:
            self.log.append(("begin",))

    def park(self, shape: tuple, dtype: torch.dtype, device,
             like: torch.Tensor | None = None) -> Parked:
        """An empty parked map (B, C, H, W) of `dtype` for rows of `device` (meta when `like`
        is)."""
        b, c, h, w = shape
        lanes = self.lanes(device)
        like = like if like is not None and like.is_meta else None
        if not self.pooled:
            buf = skip_parking.host_buffer((h, b, c, w), dtype, like=like, pinned=False)
            parked = Parked([(0, h, buf)], lanes, [], self.log)
        else:
            key = ((h, b, c, w), dtype, like is not None)
            slots = self._slots.setdefault(key, [])
            slot = next((s for s in slots if not s.taken), None)
            if slot is None:
                arena = self._arenas.setdefault(like is not None, _Arena(self.chunk_bytes))
                slot = _Slot(arena.carve((h, b, c, w), dtype, like))
                slots.append(slot)
            for event in slot.events:  # the last forward's copies of this buffer are done first
                lanes.wait(event, lanes.out)
            slot.events.clear()
            slot.taken = True
            parked = Parked(slot.blocks, lanes, slot.events, self.log)
        self._parked.append(parked)
        return parked

    def hold(self, t: torch.Tensor, device) -> Parked:
        """A map already in host memory (B, C, H, W) (any layout: its rows may not be one piece),
        read back through the same fetches."""
        return Parked([(0, t.shape[2], t.permute(2, 0, 1, 3))], self.lanes(device), [], self.log)

    def settle(self) -> None:
        """The host waits for every copy into the maps handed out this forward."""
        for parked in self._parked:
            parked.settle()

    @property
    def host_bytes(self) -> int:
        """Bytes of the pool's chunks (what the pooled maps take on the host)."""
        return sum(c.numel() for a in self._arenas.values() for c in a.chunks)
