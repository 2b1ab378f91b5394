"""The launcher's variables (torchrun, accelerate launch, or by hand): read, checked, and told
apart from the same names left over in a plain shell; and how long ranks wait for each other."""

from __future__ import annotations

import os

from dataclasses import dataclass

from ..errors import InputError


def _env_int(environ, name: str, default: int) -> int:
    value = environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{name}={value!r} in the environment is not an integer") from None


def launch_from(environ=None) -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) a launcher set; InputError for values that describe no group,
    or WORLD_SIZE > 1 without the rest of a launcher's variables (left over: refused, never a wait)."""
    environ = os.environ if environ is None else environ
    size = _env_int(environ, "WORLD_SIZE", 1)
    rank = _env_int(environ, "RANK", 0)
    local = _env_int(environ, "LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size or local < 0:
        raise InputError(f"RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local} in the environment "
                         "do not describe a process group")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not environ.get(name)]
    if size > 1 and missing:  # left over from another shell: refused now, never a wait for peers
        raise InputError(f"WORLD_SIZE={size} is set but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not: start the command with torchrun "
                         "or accelerate launch, or unset WORLD_SIZE")
    return rank, size, local


def launcher_env(environ=None) -> bool:
    """A launcher started this process: WORLD_SIZE > 1 with RANK, MASTER_ADDR and MASTER_PORT
    (torchrun and accelerate launch set them all; by hand, all must be set too)."""
    environ = os.environ if environ is None else environ
    return _env_int(environ, "WORLD_SIZE", 1) > 1 and all(
        environ.get(name) for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"))


def processes_here(world_size: int, environ=None) -> int:
    """Processes on this machine, which share its RAM: the launcher's LOCAL_WORLD_SIZE (torchrun
    sets it; a batch sharing out images counts too), else `world_size` (a dry run's
    --world-size N plans N processes here). A single-process plan outside a launcher is one
    process whatever LOCAL_WORLD_SIZE says (a variable left over from another shell)."""
    environ = os.environ if environ is None else environ
    if world_size <= 1 and not launcher_env(environ):
        return 1
    return max(1, _env_int(environ, "LOCAL_WORLD_SIZE", world_size))


def speaks(rank: int, environ=None) -> bool:
    """Whether this rank prints a line every rank would print alike (an interruption, a group
    that did not start): under torchrun's agent (TORCHELASTIC_RUN_ID), rank 0 alone; the others
    write it to torchrun's error file only. Ranks started by hand each have their own stderr."""
    environ = os.environ if environ is None else environ
    return rank == 0 or not environ.get("TORCHELASTIC_RUN_ID")


@dataclass(frozen=True)
class Timeout:
    """One kind of wait between ranks: the variable that sets it and its default in seconds."""

    env: str
    default_s: float

    def seconds(self) -> float:
        return env_seconds(self.env, self.default_s)


# One per purpose: each covers a different kind of work on the slowest rank.
START = Timeout("LINFUSION_START_TIMEOUT", 60.0)  # every rank arrives at start-up (a missing one is a mistake)
LOAD = Timeout("LINFUSION_LOAD_TIMEOUT", 3600.0)  # rank 0 loads (or downloads) the model, then the others
PEERS = Timeout("LINFUSION_GROUP_TIMEOUT", 600.0)  # any message while running (rank 0 writes a 16K stage file)


def env_seconds(name: str, default: float) -> float:
    """Seconds from an environment variable (default when unset); InputError unless in (0, 86400)."""
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 86400:
        raise InputError(f"{name}={value!r} in the environment must be seconds in (0, 86400)")
    return seconds
