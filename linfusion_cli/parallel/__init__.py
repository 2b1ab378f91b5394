"""One image over N processes (band parallelism): see docs/multi-gpu.md.

Imports only bands and the root modules; the pipeline, planner and CLI import it.
"""

from .comm import BandGroup, GroupError
from .layout import bands, check_split, level_heights
from .session import band_parallel, timeout_s

__all__ = ["BandGroup", "GroupError", "band_parallel", "bands", "check_split",
           "level_heights", "timeout_s"]
