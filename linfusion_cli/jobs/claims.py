"""Which process makes a batch entry: the manifest proves it done, another process on the folder
holds its claim or has just made it, or this one claims it (io/manifest.py: the locks)."""

from __future__ import annotations

from .. import testhooks
from ..io.manifest import Manifest
from .job import Job

DONE = "done"  # the reason for an entry the manifest shows finished, intact


def made_elsewhere(manifest: Manifest, job: Job) -> str | None:
    """Claim the job's entry for this process; why not (another process holds it or has finished
    it since this run's check), or None once it is ours to make."""
    if not manifest.claim(job.index):
        return "is being made by another process; left to it"
    record = manifest.refresh().records.get(job.index)
    drawn = job.base_seed is not None  # its seed was drawn: any seed made with these settings will do
    if record is not None and record.matches(job.plan, manifest.relative(job.path), any_seed=drawn) \
            and record.intact(manifest.folder):
        manifest.release(job.index)
        return "was made by another process meanwhile"
    testhooks.claimed(job.index)
    return None


def skip_reason(world, manifest: Manifest, job: Job, together: bool) -> str | None:
    """Why the job is not made here (DONE, another process's words), or None to make it.
    together (every image over all ranks): rank 0 decides and claims, every rank follows."""
    if together and world.rank != 0:
        return world.broadcast(None)
    if job.done is not None and job.done.intact(manifest.folder):  # not truncated, replaced or gone
        why = DONE
    else:  # another process on this folder has it, or has just made it
        why = made_elsewhere(manifest, job)
    return world.broadcast(why) if together else why
