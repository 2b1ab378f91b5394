"""Pure tile geometry: cores that partition an image, context-padded windows around them.

All coordinates are in latent pixels (1 latent px = 8 image px for SD VAEs), so every
window edge lies on a multiple of 8 image px and the encoder's stride-2 grids line up with the
untiled grid. Nothing here touches tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """One axis of a tile: the core it owns [core0, core1) inside the window [win0, win1)."""

    core0: int
    core1: int
    win0: int
    win1: int

    @property
    def core_in_window(self) -> tuple[int, int]:
        """The core relative to the window start (where to crop the window's output)."""
        return self.core0 - self.win0, self.core1 - self.win0

    @property
    def win_len(self) -> int:
        return self.win1 - self.win0


@dataclass(frozen=True)
class Tile:
    """A 2-D tile: a row span and a column span."""

    y: Span
    x: Span

    @property
    def core_area(self) -> int:
        return (self.y.core1 - self.y.core0) * (self.x.core1 - self.x.core0)

    @property
    def window_area(self) -> int:
        return self.y.win_len * self.x.win_len

    def window_slices(self, scale: int = 1) -> tuple[slice, slice]:
        """Slices of the whole map at `scale` x latent resolution that give this tile's window."""
        return (slice(self.y.win0 * scale, self.y.win1 * scale),
                slice(self.x.win0 * scale, self.x.win1 * scale))

    def core_slices(self, scale: int = 1) -> tuple[slice, slice]:
        """Slices of the whole map at `scale` x latent resolution that give this tile's core."""
        return (slice(self.y.core0 * scale, self.y.core1 * scale),
                slice(self.x.core0 * scale, self.x.core1 * scale))

    def crop_slices(self, scale: int = 1) -> tuple[slice, slice]:
        """Slices of the window's own output at `scale` that give its core."""
        (y0, y1), (x0, x1) = self.y.core_in_window, self.x.core_in_window
        return slice(y0 * scale, y1 * scale), slice(x0 * scale, x1 * scale)


def split_axis(length: int, tile: int, context: int) -> list[Span]:
    """Cut [0, length) into near-equal cores of at most `tile`, each padded by `context` (clipped)."""
    if length <= 0 or tile <= 0 or context < 0:
        raise ValueError(f"bad axis: length={length} tile={tile} context={context}")
    return split_into(length, math.ceil(length / tile), context)


def split_into(length: int, n: int, context: int) -> list[Span]:
    """Cut [0, length) into n near-equal cores (n <= length), each padded by `context` (clipped)."""
    edges = [round(i * length / n) for i in range(n + 1)]
    return [Span(a, b, max(0, a - context), min(length, b + context))
            for a, b in zip(edges[:-1], edges[1:])]


def tile_grid(height: int, width: int, tile: int, context: int) -> list[Tile]:
    """Row-major tiles covering a height x width map; cores partition it exactly once."""
    return [Tile(y, x) for y in split_axis(height, tile, context)
            for x in split_axis(width, tile, context)]


def rank_tiles(height: int, width: int, tile: int, context: int, ranks: int) -> list[list[Tile]]:
    """Each rank's tiles when `ranks` processes share a map: contiguous runs of whole tile rows
    (rank r owns a horizontal band, the union of its rows' cores), as many rows per rank: the
    one-process grid's rows when their number divides evenly, else thinner rows (a multiple of
    `ranks`). [every tile] (not shared) when ranks <= 1 or the map has fewer rows than ranks."""
    rows, cols = split_axis(height, tile, context), split_axis(width, tile, context)
    if ranks <= 1 or height < ranks:
        return [[Tile(y, x) for y in rows for x in cols]]
    if len(rows) % ranks:
        rows = split_into(height, min(height, -(-len(rows) // ranks) * ranks), context)
    cuts = [r * len(rows) // ranks for r in range(ranks + 1)]
    return [[Tile(y, x) for y in rows[cuts[r]:cuts[r + 1]] for x in cols] for r in range(ranks)]


def band_of(tiles: list[Tile]) -> tuple[int, int]:
    """(first row, end row) of the band that a rank's tiles' cores cover."""
    return min(t.y.core0 for t in tiles), max(t.y.core1 for t in tiles)


def rank_bands(height: int, width: int, tile: int, context: int, ranks: int) -> list[tuple[int, int]]:
    """Each rank's band of latent rows under rank_tiles ([(0, height)]: not shared)."""
    return [band_of(ts) for ts in rank_tiles(height, width, tile, context, ranks)]


def window_halo(windows: list[Tile], parts) -> tuple[int, int]:
    """(rows above, rows below) a band that the windows whose cores meet it read, the most over
    every band in `parts` (so that every rank asks its neighbours for the same halo)."""
    top = bottom = 0
    for a, b in parts:
        mine = [t for t in windows if t.y.core0 < b and t.y.core1 > a]
        top = max(top, a - min(t.y.win0 for t in mine))
        bottom = max(bottom, max(t.y.win1 for t in mine) - b)
    return top, bottom


def window_area_sum(tiles: list[Tile]) -> int:
    """Total window area in latent px^2 (what tiling costs, padding included)."""
    return sum(t.window_area for t in tiles)


def downscaled_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) with the long side at most `long_side`, aspect kept, each at least 1."""
    if max(height, width) <= long_side:
        return height, width
    f = long_side / max(height, width)
    return max(1, round(height * f)), max(1, round(width * f))


def choose_tile_px(height_px: int, width_px: int, *, tile_px: int = 1024,
                   untiled_max_pixels: int = 1024 * 1024) -> int:
    """Tile size for an image: 0 (untiled) when small enough to decode whole, else `tile_px`."""
    if height_px * width_px <= untiled_max_pixels:
        return 0
    return tile_px
