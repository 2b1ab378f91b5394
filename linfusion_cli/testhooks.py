"""Test-only hooks (die or hold after N images, pause at a claimed entry, out of memory at a
stage's phase), inert in production.

Each is read from its own variable but honoured only when LINFUSION_TEST_HOOKS=1 is set too, so a
variable left in a user's environment cannot change a real run.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path

from .errors import InputError

ENABLE = "LINFUSION_TEST_HOOKS"  # must be "1" for any hook below to act
AFTER_IMAGES = "LINFUSION_TEST_AFTER_IMAGES"  # "RANK:N" exit 3 after the N-th image; "RANK:N:hold"
BAND_FORWARDS = "LINFUSION_TEST_BAND_FORWARDS"  # "RANK:N" exit 3 after N band-parallel UNet forwards; "RANK:N:hold[:FILE]"
FAIL_STAGE = "LINFUSION_TEST_FAIL_STAGE"  # "RANK:N" the N-th finished stage's end fails like a full disk
PAUSE_CLAIMED = "LINFUSION_TEST_PAUSE_CLAIMED"  # "INDEX:READY:GO": touch READY, wait for GO to exist


def _spec(name: str) -> str:
    return os.environ.get(name, "") if os.environ.get(ENABLE) == "1" else ""


def after_images(rank: int, count: int) -> None:
    """A rank that dies (exit 3) or holds for a signal after its N-th image."""
    _die_or_hold(AFTER_IMAGES, rank, count)


def band_forwards(rank: int, count: int) -> None:
    """A band-parallel rank that dies (exit 3) or holds (a hung peer) after its N-th UNet forward."""
    _die_or_hold(BAND_FORWARDS, rank, count)


def stage_end(rank: int, count: int) -> None:
    """A rank whose N-th finished stage (counted over a command's images) fails as a full disk
    would (OSError ENOSPC) while the others go on."""
    spec = _spec(FAIL_STAGE)
    if spec and spec.split(":") == [str(rank), str(count)]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _die_or_hold(name: str, rank: int, count: int) -> None:
    spec = _spec(name)
    if not spec:
        return
    who, n, *action = spec.split(":", 3)
    if who in ("*", str(rank)) and count == int(n):
        sys.stdout.flush()
        if action[:1] == ["hold"]:
            if action[1:]:
                Path(action[1]).touch()  # the test knows this rank now holds (a file, not a clock)
            while True:
                signal.pause()  # until a signal (Ctrl-C) raises KeyboardInterrupt here
        os._exit(3)


def claimed(index: int) -> None:
    """Hold right after claiming entry INDEX until the test creates GO (files, not timing)."""
    spec = _spec(PAUSE_CLAIMED)
    if not spec:
        return
    want, ready, go = spec.split(":", 2)
    if int(want) != index:
        return
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.05)  # polls for the test's file; the order of events is the files'


OOM = "LINFUSION_TEST_OOM"  # "RANK:PHASE:N": out of memory at the N-th call of PHASE ("*": every)
OOM_PHASES = ("unet", "vae_decode", "vae_encode")


class OomFaults:
    """Where LINFUSION_TEST_OOM strikes in this process: counts each phase's calls (state handed
    down by the caller through the run, so a batch's later entries count on)."""

    def __init__(self, phase: str, nth: int | None):
        self.phase, self.nth = phase, nth  # nth None: every call
        self.calls = 0

    def strike(self, phase: str) -> bool:
        """Count one call of `phase`; True where this one runs out of memory."""
        if phase != self.phase:
            return False
        self.calls += 1
        return self.nth is None or self.calls == self.nth


def oom_faults(rank: int) -> OomFaults | None:
    """The LINFUSION_TEST_OOM faults of this rank, or None (unset, another rank, hooks off)."""
    spec = _spec(OOM)
    if not spec:
        return None
    try:
        who, phase, n = spec.split(":")
        nth = None if n == "*" else int(n)
        if phase not in OOM_PHASES or (nth is not None and nth < 1) or (who != "*" and int(who) < 0):
            raise ValueError
    except ValueError:
        raise InputError(f"{OOM}={spec!r}: expected RANK:PHASE:N, PHASE one of "
                         f"{', '.join(OOM_PHASES)}, RANK and N a number or *") from None
    return OomFaults(phase, nth) if who in ("*", str(rank)) else None
