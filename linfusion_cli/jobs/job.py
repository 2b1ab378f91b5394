"""One image to make: its plan and the file it writes, every check a run does before the model
loads (seed recovery, a finished image, the output and its stage files, the preview)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..io import outputs
from ..io.manifest import Record
from ..io.naming import format_of
from ..io.prompts import PromptEntry
from ..planning.plan import GenerationPlan


@dataclass(frozen=True)
class Job:
    """An image planned and its paths checked; batch entries carry their line and manifest state."""

    index: int  # the batch entry's index (0 for one image): {index} in names, the manifest's key
    plan: GenerationPlan
    path: Path | None  # None: the image goes to stdout
    fmt: str  # png, jpg or tiff
    done: Record | None = None  # the manifest's line when an earlier run finished it with this plan
    base_seed: int | None = None  # the drawn batch seed the entry's seed came from (None: fixed)
    entry: PromptEntry | None = None  # the batch line (its source and line number for messages)
    finished: bool = False  # resume of one image: it is already made with these settings (path)

    @property
    def where(self) -> str:
        """'FILE:LINE' of the batch line that asked for it, '' for one image."""
        return f"{self.entry.source}:{self.entry.line}" if self.entry is not None else ""


def check_image(plan: GenerationPlan, output: str | None, *, fmt: str | None = None,
                overwrite: bool = False, resume: bool = False, drawn: bool = False,
                init_image=None) -> Job:
    """The image's job, every path checked (finished=True: resume found it made already, its
    path in `path`, nothing to check or make): OutputError for an image, stage file or preview in
    the way (exists without overwrite, another run's checkpoint), ResumeMismatchError for
    checkpoints of other settings. drawn: the plan's seed was drawn, so resume takes the seed
    an interrupted run of this output recorded. Nothing is created."""
    if resume and drawn:
        plan = outputs.recorded_seed(plan, output, fmt=fmt, init_image=init_image)
    if resume and (done := outputs.finished(output, plan, fmt=fmt, drawn=drawn)) is not None:
        return Job(index=0, plan=plan, path=done, fmt=format_of(done, fmt), finished=True)
    path, fmt = outputs.resolve_target(output, plan=plan, fmt=fmt, overwrite=overwrite, resume=resume,
                                       create=False)
    outputs.check_preview(plan, path, overwrite=overwrite)
    return Job(index=0, plan=plan, path=path, fmt=fmt)
