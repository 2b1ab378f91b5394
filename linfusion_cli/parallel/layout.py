"""Which rows of every UNet level each rank owns: pure arithmetic, no process group.

A rank's band must stay whole through the down path's stride-2 convs, so bands are cut at the
coarsest level (height H_L) and scaled up: at level l the cuts are c_i * 2^(L - l), the last
band ending at the level's own height (ceil-halved sizes are odd-safe). Then a rank's output
rows of a downsampler are exactly its band of the next level, and an upsampler's input rows
are its band of the level below.
"""

from __future__ import annotations

from dataclasses import dataclass


def level_heights(height: int, levels: int) -> list[int]:
    """Heights of levels 0..L: each stride-2 conv (padding 1) makes ceil(h / 2)."""
    out = [height]
    for _ in range(levels):
        out.append(-(-out[-1] // 2))
    return out


def check_split(height: int, levels: int, world_size: int) -> None:
    """ValueError (one line) unless `world_size` ranks can each own rows at every level."""
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}")
    coarse = level_heights(height, levels)[-1]
    if coarse < world_size:
        raise ValueError(
            f"{world_size} ranks need at least {world_size} latent rows at the UNet's coarsest "
            f"level, which has {coarse} ({height} latent rows / {2 ** levels}): use fewer "
            f"processes or a taller image")


def bands(height: int, levels: int, world_size: int) -> list[list[tuple[int, int]]]:
    """parts[level][rank] = (first row, end row) of that rank's band; contiguous, in rank order."""
    check_split(height, levels, world_size)
    heights = level_heights(height, levels)
    coarse = heights[-1]
    cuts = [(i * coarse) // world_size for i in range(world_size + 1)]
    return [[(min(cuts[i] << (levels - l), h), min(cuts[i + 1] << (levels - l), h))
             for i in range(world_size)] for l, h in enumerate(heights)]


@dataclass(frozen=True)
class Layout:
    """The bands of one map size over a group, and this rank's place in it."""

    parts: tuple  # parts[level][rank] = (a, b)
    rank: int

    def rows(self, level: int) -> tuple[int, int]:
        """This rank's (first row, end row) at `level`."""
        return self.parts[level][self.rank]
