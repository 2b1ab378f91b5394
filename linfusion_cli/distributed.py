"""Batches under torchrun / accelerate launch: the process group, each rank's share, one stdout.

A launcher starts one process per GPU and tells each its place through RANK, WORLD_SIZE and
LOCAL_RANK (plus MASTER_ADDR/MASTER_PORT). Every rank reads and validates the whole prompt file,
then makes the entries whose index i has i % WORLD_SIZE == RANK; names and seeds come from the
index, so they do not depend on the world size. Images never cross ranks: the group (gloo, so it
works the same with or without GPUs) carries only the start-up agreement (stdin text, the batch
seed, validation errors). After that ranks are independent, so one that dies cannot block the rest.
"""

from __future__ import annotations

import datetime
import io
import torch
import torch.distributed as dist
import contextlib
import fcntl
import functools
import os
import secrets
import signal
import sys
from dataclasses import dataclass, field

from .errors import InputError, LinfusionError

from .testhooks import AFTER_IMAGES as ENV_TEST_HOOK  # noqa: F401 (tests name it from here)
from . import testhooks, interrupts


def _env_int(environ, name: str, default: int) -> int:
    value = environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{name}={value!r} in the environment is not an integer") from None


@dataclass
class World:
    """This process's place among the launcher's processes (rank 0 of 1 without a launcher)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    seed: int = field(default_factory=lambda: secrets.randbelow(2 ** 32))  # same on every rank
    agreed: bool = False
    owns_group: bool = False  # this command created the process group (and ends it after agreeing)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def owns(self, index: int) -> bool:
        """Entry `index` is this rank's: round robin, so mixed sizes spread evenly."""
        return index % self.size == self.rank

    def device(self, requested: str | None) -> str | None:
        """This rank's GPU when one of several processes: cuda:(LOCAL_RANK % GPUs visible), so a
        launcher that gives each process one visible GPU works too; a --device naming one GPU
        would put every rank on it: refused. The CPU without a GPU."""
        if not self.distributed:
            return requested
        if requested not in (None, "auto", "cuda"):
            if str(requested).startswith("cuda:"):
                raise InputError(f"--device {requested} names one GPU, but {self.size} processes were "
                                 "launched: every rank would use it; pass --device cuda (rank r "
                                 "takes GPU LOCAL_RANK % visible GPUs) or set CUDA_VISIBLE_DEVICES")
            return requested
        if not torch.cuda.is_available():
            return requested
        return f"cuda:{self.local_rank % max(1, torch.cuda.device_count())}"

    # ------------------------------------------------------------ start-up agreement (collectives)

    def broadcast(self, value):
        """Rank 0's value on every rank."""
        if not self.distributed:
            return value

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def stdin(self):
        """Rank 0 reads stdin and shares the text: the launcher gives every rank the same pipe."""
        if not self.distributed:
            return sys.stdin
        text, problem = None, None
        if self.rank == 0:
            try:
                text = sys.stdin.read()
            except (OSError, UnicodeDecodeError) as exc:  # every rank must reach the broadcast
                problem = f"cannot read the prompts from stdin: {exc}"
        text, problem = self.broadcast((text, problem))
        if problem is not None:
            raise InputError(problem)
        return io.StringIO(text)

    def agree(self, failure: BaseException | None = None, keep: bool = False) -> None:
        """Every rank reports its validation; if any failed, all raise the lowest failing rank's error.

        Only rank 0 prints it (the error's `echo` is False elsewhere), so one bad file gives one line.
        keep: the group stays for the run (band parallelism: one image over every rank).
        """
        if self.agreed or not self.distributed:
            self.agreed = True
            if failure is not None:
                raise failure
            return

        self.agreed = True
        mine = None
        if failure is not None:
            cls = type(failure) if isinstance(failure, LinfusionError) else LinfusionError
            text = str(failure) if isinstance(failure, LinfusionError) else \
                f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
            mine = (cls, text)
        reports = [None] * self.size
        dist.all_gather_object(reports, mine)
        if self.owns_group and not keep:  # nothing crosses ranks after this: a rank that dies cannot block others,
            dist.destroy_process_group()  # and libraries see no group (transformers saves on rank 0 only)
        for rank, report in enumerate(reports):
            if report is not None:
                cls, text = report
                text = text if rank == 0 else f"rank {rank}: {text}"
                try:
                    exc = cls(text)
                except TypeError:  # an error class with another signature: keep its exit code
                    exc = LinfusionError(text)
                    exc.exit_code = cls.exit_code
                exc.echo = self.rank == 0
                raise exc from None

    # ------------------------------------------------------------ output

    def emit(self, line: str) -> None:
        """One whole stdout line, written once even when several ranks share the pipe."""
        if not self.distributed:
            print(line, flush=True)
            return
        sys.stdout.flush()
        data = (line + "\n").encode("utf-8")
        fd = sys.stdout.fileno()
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # lines over PIPE_BUF could interleave without it
        except OSError:
            locked = False
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def finished(self, count: int) -> None:
        """Test hook (testhooks.after_images; inert unless LINFUSION_TEST_HOOKS=1)."""
        testhooks.after_images(self.rank, count)


def from_env(environ=None) -> World:
    """The launcher's RANK / WORLD_SIZE / LOCAL_RANK (torchrun and accelerate set all three)."""
    environ = os.environ if environ is None else environ
    size = _env_int(environ, "WORLD_SIZE", 1)
    rank = _env_int(environ, "RANK", 0)
    local = _env_int(environ, "LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size or local < 0:
        raise InputError(f"RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local} in the environment "
                         "do not describe a process group")
    return World(rank=rank, size=size, local_rank=local)


def processes_here(world_size: int, environ=None) -> int:
    """Processes on this machine, which share its RAM: the launcher's LOCAL_WORLD_SIZE (torchrun
    sets it; a batch sharing out images counts too), else `world_size` (a dry run's
    --world-size N plans N processes here)."""
    environ = os.environ if environ is None else environ
    return max(1, _env_int(environ, "LOCAL_WORLD_SIZE", world_size))


_current = World()


def current() -> World:
    """The world of the command that is running (rank 0 of 1 outside `launched`)."""
    return _current


def _stop_once(signum, frame):
    """Ctrl-C, or the launcher's SIGINT/SIGTERM when another rank failed: stop once, cleanly."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the terminal and the launcher both send one
    interrupts.handle(signum, frame)  # exit 128 + signum, like a single process


@contextlib.contextmanager
def joined(world: World):
    """Join the launcher's group for the start-up agreement (gloo); it ends once the ranks agree."""
    global _current
    if not world.distributed:
        _current = world
        try:
            yield world
        finally:
            _current = World()
        return
    handlers = {sig: signal.signal(sig, _stop_once) for sig in (signal.SIGINT, signal.SIGTERM)}
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
    try:
        if not dist.is_initialized():
            _start_group(world)
        world.seed = world.broadcast(world.seed)
    except BaseException:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        raise
    _current = world
    interrupted = False
    try:
        yield world
    except KeyboardInterrupt:
        interrupted = True
        raise
    except BaseException as exc:
        if not world.agreed:  # failed while validating: the others wait for this rank's report
            world.agree(exc)
        raise
    finally:
        _current = World()
        if world.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        if not interrupted:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


GROUP_TIMEOUT_ENV = "LINFUSION_GROUP_TIMEOUT"  # seconds the ranks wait for each other at start-up
GROUP_TIMEOUT_S = 60.0


def _start_group(world: World) -> None:
    """init_process_group with a timeout; launcher variables left without a launcher, or peers
    that never come, are one line (InputError / LinfusionError), never a hang or a traceback."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise InputError(f"WORLD_SIZE={world.size} is set but {' and '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not: start the batch with torchrun "
                         "or accelerate launch, or unset WORLD_SIZE and RANK")
    timeout = env_seconds(GROUP_TIMEOUT_ENV, GROUP_TIMEOUT_S)
    try:
        dist.init_process_group("gloo", rank=world.rank, world_size=world.size,
                                timeout=datetime.timedelta(seconds=timeout))
    except Exception as exc:  # noqa: BLE001 -- DistStoreError, ValueError, RuntimeError: one line
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LinfusionError(f"the process group of WORLD_SIZE={world.size} did not start within "
                             f"{timeout:g} s ({why}); are the other ranks running? (a plain run: "
                             "unset WORLD_SIZE and RANK)") from None
    world.owns_group = True


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


def launched(command):
    """Decorator: run a CLI command inside the launcher's process group (a no-op without one)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        with joined(from_env()):
            return command(*args, **kwargs)

    return wrapper
