"""The messages of a band-parallel forward: halo rows, GroupNorm moments, LinFusion key states.

Every rank runs the same band-wise code (linfusion_cli/bands) on its own band of rows; the
blocks call the level's communicator (`Level`) at the only points where a band needs more than
its own rows: before a convolution (the neighbours' halo rows, point to point), at a GroupNorm
(per-channel sums, all-reduced) and at a LinFusion layer (the d x (d + 1) state per head,
all-reduced). Sums, never means, so unequal bands are exact. `BandGroup.sent` counts the bytes
this rank hands to the network per kind (a ring all-reduce moves about 2 (N - 1) / N times its
buffer; the counts are the buffers).
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
import torch.distributed as dist

from .. import testhooks
from ..bands.rows import Halo, Moments, Rows
from ..errors import LinfusionError
from .layout import Layout, bands

KINDS = ("halo", "moments", "key_state", "gather", "vae")


class GroupError(LinfusionError):
    """A peer of the band-parallel group stopped or did not answer in time: this rank stops."""


@contextlib.contextmanager
def one_line_failures():
    """torch.distributed's failures (a peer's socket closed, the group's timeout) as one line."""
    try:
        yield
    except RuntimeError as exc:  # DistBackendError and gloo's errors are RuntimeErrors
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise GroupError(f"band-parallel run stopped: another rank failed, was stopped or did not "
                         f"answer in time ({first[:160]})") from None


def _like(src: Rows) -> torch.Tensor | None:
    """A tensor of src's dtype (for receive buffers), found without computing any row."""
    for name in ("t", "a", "low", "src"):
        inner = getattr(src, name, None)
        if torch.is_tensor(inner):
            return inner
        if isinstance(inner, Rows):
            return _like(inner)
    return None


class BandGroup:
    """N processes that compute one image together, each owning a band of rows of every map.

    `pg`: the torch.distributed group (None: the default one). Handed to the band-wise forwards
    (bands/unet_forward.py's `group` argument), which never import this package.
    """

    def __init__(self, rank: int, size: int, device: torch.device | str = "cpu", pg=None):
        self.rank, self.size, self.device, self.pg = rank, size, torch.device(device), pg
        self.sent: Counter = Counter()
        self.forwards = 0  # UNet forwards gathered so far (the test hook counts them)
        self._layouts: dict = {}
        self.closed = False

    def layout(self, height: int, levels: int) -> GroupLayout:
        """The bands of a map `height` rows tall through `levels` halvings (cached)."""
        key = (height, levels)
        if key not in self._layouts:
            self._layouts[key] = GroupLayout(self, Layout(tuple(map(tuple, bands(height, levels, self.size))),
                                                          self.rank))
        return self._layouts[key]

    def split(self, parts) -> Level:
        """The communicator of one map whose rows are split as parts[rank] = (a, b), contiguous in
        rank order (the tiled VAE's latent-resolution bands, cut along its tile rows)."""
        return Level(self, tuple(map(tuple, parts)))

    def gather_rows(self, local: torch.Tensor, parts, kind: str) -> torch.Tensor:
        """Every rank's rows (h_q, ...) of a map split along dim 0 as `parts`, as the whole map
        (H, ...): received into one buffer, then closed up where bands are shorter than the
        longest (no second whole copy)."""
        most = max(b - a for a, b in parts)
        buf = local.new_empty(self.size * most, *local.shape[1:])
        mine = local
        if local.shape[0] < most:
            mine = local.new_zeros(most, *local.shape[1:])
            mine[:local.shape[0]] = local
        self.sent[kind] += mine.numel() * mine.element_size()
        with one_line_failures():
            dist.all_gather(list(buf.split(most)), mine.contiguous(), group=self.pg)
        return _close_up(buf, most, parts)

    def close(self) -> None:
        """Shut the group's connections down now, not whenever the interpreter frees it."""
        if self.pg is not None and not self.closed and dist.is_initialized():
            dist.destroy_process_group(self.pg)
        self.closed = True  # (a closed group is not reopened: a later message fails, loudly)

    def barrier(self) -> None:
        """Every rank has come this far (within the group's timeout)."""
        with one_line_failures():
            dist.barrier(group=self.pg)

    def all_reduce(self, flat: torch.Tensor, kind: str) -> torch.Tensor:
        """The sum over ranks of a 1-D buffer, in place."""
        self.sent[kind] += flat.numel() * flat.element_size()
        with one_line_failures():
            dist.all_reduce(flat, group=self.pg)
        return flat

    def agree(self, code: int) -> int:
        """The highest of every rank's status code (pipeline/recovery.py): one int64, all-reduced
        with MAX, on this group's device (NCCL carries CUDA tensors only)."""
        flat = torch.tensor([code], dtype=torch.int64, device=self.device)
        with one_line_failures():
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self.pg)
        return int(flat.item())

    def gather(self, local: torch.Tensor, level: Level) -> torch.Tensor:
        """Every rank's band (B, C, h_q, W) of a level-0 map, as the whole map (B, C, H, W)."""
        rows = self.gather_rows(local.movedim(2, 0).contiguous(), level.parts, "gather")  # (H, B, C, W)
        self.forwards += 1
        testhooks.band_forwards(self.rank, self.forwards)  # inert unless LINFUSION_TEST_HOOKS=1
        return rows.movedim(0, 2).contiguous()

    def exchange(self, sends: dict, recvs: dict) -> None:
        """Point-to-point: sends {rank: tensor}, recvs {rank: buffer}, all at once."""
        ops = [dist.P2POp(dist.isend, t.contiguous(), peer, group=self.pg) for peer, t in sends.items()]
        ops += [dist.P2POp(dist.irecv, t, peer, group=self.pg) for peer, t in recvs.items()]
        for t in sends.values():
            self.sent["halo"] += t.numel() * t.element_size()
        if ops:
            with one_line_failures():
                for work in dist.batch_isend_irecv(ops):
                    work.wait()


def _close_up(buf: torch.Tensor, most: int, parts) -> torch.Tensor:
    """buf's rank-q piece (rows q * most ...) moved to the map's rows of q, in place: (H, ...)."""
    at = 0
    for q, (a, b) in enumerate(parts):
        if at != q * most:  # moves up: the rows it overwrites are already in place or unused
            buf[at:at + b - a] = buf[q * most:q * most + b - a].clone()
        at += b - a
    return buf[:at]


class GroupLayout:
    """A Layout bound to its group: `at(level)` is the communicator bands/ calls."""

    def __init__(self, group: BandGroup, layout: Layout):
        self.group, self.layout = group, layout
        self._levels = [Level(group, parts) for parts in layout.parts]

    def rows(self, level: int) -> tuple[int, int]:
        return self.layout.rows(level)

    def at(self, level: int) -> Level:
        return self._levels[level]


class Level:
    """One UNet level's bands: what bands/layers.py calls as `comm`."""

    def __init__(self, group: BandGroup, parts):
        self.group, self.parts = group, parts
        self.height = parts[-1][1]
        self.a, self.b = parts[group.rank]

    def halo(self, src: Rows, top: int, bottom: int) -> Halo:
        """src (this rank's rows [a, b) of the map) with rows [a - top, a) and [b, b + bottom)
        of the whole map from the ranks that own them (fewer at the map's edges)."""
        me, a, b = self.group.rank, self.a, self.b
        sends, recvs, order = {}, {}, []
        like = _like(src)  # received rows come in src's dtype
        for q, (qa, qb) in enumerate(self.parts):
            if q == me:
                continue
            for lo, hi in ((max(qa - top, 0), qa), (qb, min(qb + bottom, self.height))):
                x0, x1 = max(lo, a), min(hi, b)  # rows of mine that q needs
                if x0 < x1:
                    sends[q] = src.rows(x0 - a, x1 - a)
            for lo, hi in ((max(a - top, 0), a), (b, min(b + bottom, self.height))):
                x0, x1 = max(lo, qa), min(hi, qb)  # rows of q's that I need
                if x0 < x1:
                    if like is None:  # a computed source: one of its rows says its dtype
                        like = src.rows(0, 1)
                    shape = (src.batch, src.channels, x1 - x0, src.width)
                    recvs[q] = torch.empty(shape, dtype=like.dtype, device=self.group.device)
                    order.append((x0, q))
        self.group.exchange(sends, recvs)
        empty = torch.empty(src.batch, src.channels, 0, src.width, device=self.group.device,
                            dtype=like.dtype if like is not None else torch.float32)
        above = [recvs[q] for x0, q in sorted(order) if x0 < a]
        below = [recvs[q] for x0, q in sorted(order) if x0 >= b]
        top_t = torch.cat(above, dim=2) if above else empty
        bottom_t = torch.cat(below, dim=2) if below else empty
        return Halo(src, top_t, bottom_t)

    def moments(self, m: Moments) -> Moments:
        """m's sums over every rank's band: the whole map's GroupNorm moments (float64)."""
        b, c = m.sum.shape
        flat = self.group.all_reduce(torch.cat([m.sum.reshape(-1), m.sq.reshape(-1)]), "moments")
        out = Moments()
        out.sum, out.sq = flat[:b * c].view(b, c), flat[b * c:].view(b, c)
        out.count = self.tokens(m.count)  # every rank's band is the same width
        return out

    def key_state(self, state, n_total: int) -> None:
        """state (kv (B, h, d, d), k_sum (B, h, 1, d)) summed over every rank's tokens, in place."""
        flat = torch.cat([state.kv.reshape(-1), state.k_sum.reshape(-1)])
        flat = self.group.all_reduce(flat, "key_state")
        n = state.kv.numel()
        state.kv.copy_(flat[:n].view_as(state.kv))
        state.k_sum.copy_(flat[n:].view_as(state.k_sum))
        state.count = n_total

    def gather(self, local: torch.Tensor, kind: str = "gather") -> torch.Tensor:
        """Every rank's band (h_q, ...) (rows along dim 0) as the whole map (H, ...)."""
        return self.group.gather_rows(local, self.parts, kind)

    def tokens(self, local: int) -> int:
        """The whole map's token count from this rank's (rows x width)."""
        return local // (self.b - self.a) * self.height
