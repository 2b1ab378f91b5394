"""One image over N processes (band parallelism): see docs/multi-gpu.md.

Imports only bands and the root modules; the pipeline, planner and CLI import it.
"""

from .comm import BandGroup, GroupError
from .layout import bands, check_split, level_heights
from .session import activated, active, band_parallel, timeout_s

WHOLE = 1 << 20  # band rows when the plan has none: one band per rank and level

__all__ = ["WHOLE", "BandGroup", "GroupError", "activated", "active", "band_parallel", "bands", "check_split",
           "level_heights", "timeout_s"]
