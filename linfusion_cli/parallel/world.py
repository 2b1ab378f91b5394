"""A command under torchrun / accelerate launch: the launcher's process group, what its ranks
agree on before loading, each rank's share of a batch, one stdout.

A launcher starts one process per GPU and tells each its place through RANK, WORLD_SIZE and
LOCAL_RANK (plus MASTER_ADDR/MASTER_PORT). Every rank reads and validates the whole command (or
prompt file) and the ranks agree on what they make before any loads a model. A batch sharing out
images makes the entries whose index i has i % WORLD_SIZE == RANK (names and seeds come from the
index, not the world size) and ends the group after the agreement, so a rank that dies cannot
block the rest; one image over every rank (band parallelism, parallel/session.py) keeps it for the
ranks' agreement at each stage's end. The waits are parallel/launch.py's START, LOAD and PEERS.
"""

from __future__ import annotations

import datetime
import io
import threading
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

from ..errors import InputError, LinfusionError
from ..differences import digest as _digest, first_difference
from .comm import one_line_failures
from .launch import LOAD, PEERS, START, launch_from, speaks

from .. import testhooks, interrupts


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
    #
    # Until the agreement every exchange is one all_gather_object of (step, failure, payload), so
    # ranks at different steps (one failed early, one took another path) never reach mismatched
    # collectives: any failure, or any rank at another step, stops every rank at once.

    def broadcast(self, value):
        """Rank 0's value on every rank (after the agreement: ranks run in step)."""
        if not self.distributed:
            return value

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share(self, value):
        """Rank 0's value on every rank during the start-up (before agree)."""
        if not self.distributed:
            return value
        return self._exchange("share", None, value if self.rank == 0 else None)[0]

    def _exchange(self, step: str, failure: BaseException | None, payload) -> list:
        """Every rank's payload; raises on every rank the first failing rank's error (printed by
        rank 0 only), or InputError when a rank is at another step than rank 0, both ending the
        start-up agreement."""
        got = [None] * self.size
        dist.all_gather_object(got, (step, _report(failure) if failure is not None else None, payload))
        first = next((r for r, (_, report, _) in enumerate(got) if report is not None), None)
        if first is not None:
            self.agreed = True
            cls, text = got[first][1]
            text = text if first == 0 else f"rank {first}: {text}"
            try:
                exc = cls(text)
            except TypeError:  # an error class with another signature: keep its exit code
                exc = LinfusionError(text)
                exc.exit_code = cls.exit_code
            exc.echo = self.rank == 0
            raise exc from None
        other = next((r for r, (at, _, _) in enumerate(got) if at != got[0][0]), None)
        if other is not None:
            self.agreed = True
            raise InputError(f"rank {other} is at another step of the start-up than rank 0 ({got[other][0]}, "
                             f"not {got[0][0]}): start every rank with the same command and arguments")
        return [payload for _, _, payload in got]

    def stdin(self):
        """Rank 0 reads stdin and shares the text: the launcher gives every rank the same pipe."""
        if not self.distributed:
            return sys.stdin
        text, problem = None, None
        if self.rank == 0:
            try:
                text = sys.stdin.read()
            except (OSError, UnicodeDecodeError) as exc:  # every rank must reach the exchange
                problem = f"cannot read the prompts from stdin: {exc}"
        text, problem = self.share((text, problem))
        if problem is not None:
            raise InputError(problem)
        return io.StringIO(text)

    def agree(self, failure: BaseException | None = None, keep: bool = False, made=None) -> None:
        """Every rank reports its validation; if any failed, all raise the lowest failing rank's error.

        Only rank 0 prints it (the error's `echo` is False elsewhere), so one bad file gives one line.
        keep: the group stays for the run (band parallelism: one image over every rank).
        made: what this rank is about to make (JSON-able: plans, entries); when every rank
        validated, each compares its own with rank 0's and a difference is InputError on every
        rank, naming the first differing field (rank 0 decides what is made, nothing else runs).
        """
        if self.agreed or not self.distributed:
            self.agreed = True
            if failure is not None:
                raise failure
            return

        self.agreed = True
        try:
            digests = self._exchange("agree", failure, _digest(made) if failure is None else None)
            if any(d != digests[0] for d in digests):
                self._differs(made, digests)  # every rank takes part: all know a digest differs
        finally:
            if self.owns_group and not keep:  # nothing crosses ranks after this: a rank that dies cannot
                dist.destroy_process_group()  # block others, and libraries see no group (transformers saves on rank 0 only)

    def _differs(self, made, digests) -> None:
        """Rank 0's `made` to every rank; each names its first difference; all raise the first
        differing rank's line (every rank prints it: each stops on its own terminal or log)."""
        box = [made if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        mine = None if digests[self.rank] == digests[0] else \
            first_difference(box[0], made, who=f"on rank {self.rank}")
        lines = [None] * self.size
        dist.all_gather_object(lines, mine)
        dist.barrier()  # every rank has its lines before any tears the group down (seen: an abort)
        rank, where = next((r, line or "the digest") for r, line in enumerate(lines)
                           if digests[r] != digests[0])
        raise InputError(f"rank {rank} would make something else than rank 0: {where}; start every "
                         "rank with the same command, files and presets") from None

    def decide(self, choose):
        """choose() on rank 0 and its value on every rank (what rank 0's files say: a resume
        start); its error, on every rank, as AgreedFailure (printed as _agreed says)."""
        if not self.distributed:
            return choose()
        value = report = None
        if self.rank == 0:
            try:
                value = choose()
            except Exception as exc:  # noqa: BLE001 -- every rank must reach the broadcast
                report = _report(exc)
        value, report = self.broadcast((value, report))
        if report is not None:
            raise _agreed(report, self.rank) from None
        return value

    def outcome(self, failure: Exception | None) -> None:
        """Band parallelism, at a stage's or an entry's end: every rank says how it went, so all
        fail together or go on together; a rank that failed alone never leaves the others waiting
        in a collective. Any failure is AgreedFailure on every rank (the first failing rank's
        line, printed as _agreed says)."""
        if not self.distributed:
            if failure is not None:
                raise failure
            return
        reports = [None] * self.size
        dist.all_gather_object(reports, _report(failure) if failure is not None else None)
        first = next((r for r, report in enumerate(reports) if report is not None), None)
        if first is None:
            return
        cls, text = reports[first]
        raise _agreed((cls, text if first == 0 else f"rank {first}: {text}"), self.rank) from failure

    def in_turn(self, load):
        """load() on rank 0 first, then on every other rank (a demo model is built and a download
        made once, then read from the cache), all waiting up to LOAD for each other; then every
        rank has its model, so no message of the run waits on a peer's load (PEERS stays short).
        Band parallelism only: the launcher's group is kept for the run (agree(keep=True))."""
        if not self.distributed:
            return load()
        timeout = datetime.timedelta(seconds=LOAD.seconds())

        def meet():  # gloo's barrier that takes its own timeout (the group's is PEERS)
            with one_line_failures():
                dist.monitored_barrier(timeout=timeout)
        if self.rank != 0:
            meet()
        try:
            return load()
        finally:
            if self.rank == 0:
                meet()
            meet()

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


class AgreedFailure(LinfusionError):
    """Another rank failed at a point every rank passes (World.outcome): all ranks know already."""


def _report(failure: BaseException) -> tuple:
    """(error class, one line) of a failure, as it crosses ranks."""
    cls = type(failure) if isinstance(failure, LinfusionError) else LinfusionError
    text = str(failure) if isinstance(failure, LinfusionError) else \
        f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
    return cls, text


def _agreed(report: tuple, rank: int) -> AgreedFailure:
    """A failure every rank knows of, with its class's exit code, printed where speaks(rank):
    under torchrun by rank 0 alone, by hand by every rank (each has its own stderr)."""
    cls, text = report
    exc = AgreedFailure(text)
    exc.exit_code, exc.echo = cls.exit_code, speaks(rank)
    return exc


def from_env(environ=None) -> World:
    """The launcher's RANK / WORLD_SIZE / LOCAL_RANK (torchrun and accelerate set all three)."""
    rank, size, local = launch_from(environ)
    return World(rank=rank, size=size, local_rank=local)


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
        world.seed = world.share(world.seed)
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


def _start_group(world: World) -> None:
    """init_process_group with a timeout; peers that never come are one line (LinfusionError)
    within it, never a hang or a traceback. The wait runs in a helper thread so that the main
    thread still takes Ctrl-C and SIGTERM (torch's store wait does not return to Python).
    Once started, the group waits PEERS for a message (rank 0 may be writing a stage file)."""
    timeout, running, _ = START.seconds(), PEERS.seconds(), LOAD.seconds()  # bad values: refused now
    outcome: list = []

    def start():
        try:
            dist.init_process_group("gloo", rank=world.rank, world_size=world.size,
                                    timeout=datetime.timedelta(seconds=timeout))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 -- DistStoreError, ValueError, RuntimeError: one line
            outcome.append(exc)

    helper = threading.Thread(target=start, name="linfusion-group-start", daemon=True)
    helper.start()
    while helper.is_alive():
        helper.join(0.25)  # a signal's handler runs between joins: Interrupted leaves at once
    exc = outcome[0] if outcome else RuntimeError("the group's start-up thread stopped")
    if exc is not None:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        problem = LinfusionError(f"the process group of WORLD_SIZE={world.size} did not start "
                                 f"within {timeout:g} s ({why[:160]}); are the other ranks running? "
                                 "(a plain run: unset WORLD_SIZE and RANK)")
        problem.echo = speaks(world.rank)
        raise problem from None
    # torch's public API sets a group's timeout only when it is made; the start-up's (a missing
    # rank) is much shorter than a running rank's wait, so the default group's is changed here.
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=running))
    world.owns_group = True


def launched(command):
    """Decorator: run a CLI command inside the launcher's process group (a no-op without one)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        with joined(from_env()):
            return command(*args, **kwargs)

    return wrapper
