"""What a launcher's ranks make, in the form they compare before loading (World.agree's `made`),
and the points where band-parallel ranks agree on how a run went (each stage's end, each image's):
api.generate_file takes a StageSync and agrees at both, so a caller under a launcher gets it too."""

from __future__ import annotations

import json

from .. import testhooks
from ..parallel.world import AgreedFailure
from ..parallel import GroupError
from ..pipeline.events import StageFinished

# each rank's own machine, not what it makes: its device, its memory budget, its GPU's prediction
OWN = ("device", "gpu", "budget", "predicted_s")


def plan_made(plan, knobs: bool = True) -> dict:
    """The plan as the dry run's JSON shows it, less what is each rank's own (OWN, the stages'
    memory estimates and predicted cost). knobs: keep the memory knobs (band parallelism: they
    decide the messages); without, each rank plans its own memory (a batch sharing out images)."""
    d = plan.to_dict()
    for key in OWN:
        d.pop(key, None)
    for stage in d["stages"]:
        stage.pop("cost", None)
        memory = stage.get("memory") or {}
        for key in [k for k in memory if not knobs or k.startswith("estimated") or k.endswith("_gib")]:
            memory.pop(key)
    return json.loads(json.dumps(d, default=str))  # tuples as lists: compared field by field


def made(plan, path, knobs: bool = True, **flags) -> dict:
    """One image as ranks compare it: its plan (first, so a difference names the plan's field
    rather than the file name it derives), its output, the command's flags that change the run."""
    return {"plan": plan_made(plan, knobs), "path": str(path) if path is not None else "-", **flags}


class StageSync:
    """on_event for band-parallel ranks: at each stage's end (after rank 0's checkpoint, before the
    next stage's messages or the final write) every rank says how it went (World.outcome), so a
    rank that failed alone never leaves the others in a collective."""

    def __init__(self, world):
        self.world, self.stages = world, 0  # stages: counted over every image this process makes

    def image(self, make):
        """make() on every rank; then all raise the first rank's failure or none does."""
        try:
            result = make()
        except Exception as exc:  # noqa: BLE001 -- every rank learns of it, then all raise
            entry_end(self.world, exc)
        entry_end(self.world, None)
        return result

    def around(self, on_event):
        def handle(event):
            if isinstance(event, StageFinished) and self.world.distributed:
                self.stages += 1
                try:
                    testhooks.stage_end(self.world.rank, self.stages)  # inert unless LINFUSION_TEST_HOOKS=1
                except OSError as exc:
                    self.world.outcome(exc)
                self.world.outcome(None)
            if on_event is not None:
                on_event(event)
        return handle


def entry_end(world, failure: Exception | None) -> None:
    """An image's end on every band-parallel rank: all raise the first failure (AgreedFailure) or
    none does. A failure the ranks already agreed on, or a group that is gone, passes as it is."""
    if isinstance(failure, (AgreedFailure, GroupError)):
        raise failure
    world.outcome(failure)
