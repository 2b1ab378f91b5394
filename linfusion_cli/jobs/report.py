"""What a batch run tells its caller as it goes (api.run_batch): the CLI draws and prints it; a
Python caller may leave every method as it is."""

from __future__ import annotations

from .job import Job


class BatchReport:
    """Callbacks of api.run_batch, in the order they come for each job; k counts from 1."""

    def skipped(self, job: Job, k: int, why: str) -> None:
        """The job is not made here: claims.DONE (the manifest proves it), or another process's words."""

    def loading(self, job: Job) -> None:
        """The model loads now, once, for the first job made."""

    def started(self, job: Job, k: int):
        """The job starts; the result is its on_event handler (pipeline events), or None."""
        return None

    def note(self, job: Job, k: int, line: str) -> None:
        """A line about the job (where its resume starts, a checkpoint passed over)."""

    def ended(self, job: Job, k: int, result: dict | None, error: BaseException | None) -> None:
        """The job's run is over (error: why it failed; both None: interrupted), before it is recorded."""

    def made(self, job: Job, result: dict) -> None:
        """The job's image is written and in the manifest (the writing rank only)."""

    def failed(self, job: Job, error: Exception) -> None:
        """The job failed; the others still run (the writing rank only)."""
