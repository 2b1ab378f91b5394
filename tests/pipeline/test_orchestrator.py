"""Out-of-memory in a stage (a stand-in stage): a retry with a tighter plan, then a clear error
(tests/pipeline/test_recovery.py runs the real stages)."""

import numpy as np
import pytest
import torch

from linfusion_cli.errors import OutOfMemoryError
from linfusion_cli.planning.memory.planner import MemoryPlan
from linfusion_cli.pipeline import Retrying, StageFinished, orchestrator
from linfusion_cli.planning.plan import build_plan
from linfusion_cli.pipeline.applied_memory import PlanInEffect
from linfusion_cli.runtime.applied import KnobsInEffect

from ..model_helpers import bare_model


@pytest.fixture
def fake_model(monkeypatch):
    """No real components: the stage functions are replaced, the context needs no pipelines."""
    monkeypatch.setattr(orchestrator.StageContext, "__post_init__", lambda self: None)
    monkeypatch.setattr(orchestrator, "memory_plan_applied",
                        lambda model, memory, group: _nullcontext(PlanInEffect(KnobsInEffect(), {})))
    return bare_model()


class _nullcontext:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False


def plan_with_memory():
    plan = build_plan(prompt="p", width=256, height=128, native=64, strengths=[0.5], steps=4,
                      guidance=5.0, seed=1, scheduler="ddim", model="m", family="sd15", linfusion=None)
    return plan.with_memory([MemoryPlan(estimated_peak_gib=1.0)] * len(plan.stages))


def test_stage_retried_once_with_a_tighter_plan(monkeypatch, fake_model):
    calls = []

    def flaky(ctx, stage, previous, knobs):
        calls.append(stage.memory)
        if stage.index == 1 and len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return np.zeros((stage.height, stage.width, 3), np.uint8)

    monkeypatch.setattr(orchestrator, "stage_function", lambda stage: flaky)
    events = []
    image, record = orchestrator.run_plan(plan_with_memory(), fake_model, on_event=events.append)
    assert image.shape == (128, 256, 3)
    assert [type(e) for e in events if isinstance(e, Retrying)] == [Retrying]
    retried = calls[2]
    assert retried != calls[1] and retried.estimated_peak_gib <= calls[1].estimated_peak_gib
    assert record["stages"][1]["memory"] == retried.to_dict()  # the record says what really ran


def test_second_out_of_memory_stops_with_one_clear_error_and_keeps_finished_stages(monkeypatch, fake_model):
    def always_oom_after_base(ctx, stage, previous, knobs):
        if stage.index == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return np.zeros((stage.height, stage.width, 3), np.uint8)

    monkeypatch.setattr(orchestrator, "stage_function", lambda stage: always_oom_after_base)
    finished = []
    with pytest.raises(OutOfMemoryError, match=r"stage 2 \(256x128\) ran out of device memory"):
        orchestrator.run_plan(plan_with_memory(), fake_model,
                              on_event=lambda e: isinstance(e, StageFinished) and finished.append(e.stage))
    assert finished == [0]  # the base stage was reported (and so saved) before the failure
