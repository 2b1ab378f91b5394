"""One image over N processes (band parallelism): see docs/multi-gpu.md."""

from .comm import BandGroup
from .layout import bands, check_split, level_heights

__all__ = ["BandGroup", "bands", "check_split", "level_heights"]
