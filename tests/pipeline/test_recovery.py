"""Out-of-memory recovery through the real stages: LINFUSION_TEST_OOM's faults strike at a phase's
entry inside the stage, the stage is re-planned tighter for that phase, and the image is the one a
run planned with the final plan gives; nothing of a failed attempt stays on the modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linfusion_cli import testhooks
from linfusion_cli.errors import OutOfMemoryError
from linfusion_cli.models.loading import load_model
from linfusion_cli.pipeline import Retrying, StageFinished, run_plan
from linfusion_cli.pipeline.knobs import KnobHandle
from linfusion_cli.pipeline.recovery import is_oom
from linfusion_cli.planning.memory.planner import MemoryPlan
from linfusion_cli.planning.plan import build_plan

PLANNED = MemoryPlan(attn_chunk=64, ff_chunk=4096, inplace=True)  # the UNet's retry: cfg_split, then bands


@pytest.fixture(scope="module")
def loaded(tiny_pipeline_dirs):
    return load_model(str(tiny_pipeline_dirs["sd15"]), linfusion="fresh", family="sd15")


def _plan(loaded, memories):
    plan = build_plan(prompt="a boat", width=128, height=128, native=64, strengths=[0.5], steps=2,
                      guidance=5.0, seed=3, scheduler="default", model=loaded.model,
                      family="sd15", linfusion="fresh", vae_tile_px=0)
    return plan.with_memory(memories)


def fingerprint(pipe) -> list:
    """What a memory plan can leave on a module: forward patches, hooks, attributes, SiLU kinds."""
    out = []
    for part in ("unet", "vae", "text_encoder"):
        for name, m in getattr(pipe, part).named_modules():
            out.append((part, name, type(m).__name__, "forward" in m.__dict__, len(m._forward_hooks),
                        len(m._forward_pre_hooks), getattr(m, "chunk_size", None),
                        sorted(k for k in vars(m) if not k.startswith("_")), hasattr(m, "_hf_hook"),
                        next(m.parameters(), torch.empty(0)).device.type))
    return out


@pytest.mark.parametrize("phase,nth,stage", [("unet", 1, 0), ("vae_decode", 2, 1), ("vae_encode", 1, 1)])
def test_out_of_memory_in_a_phase_recovers_with_the_image_of_the_final_plan(loaded, phase, nth, stage):
    before = fingerprint(loaded.pipe)
    events = []
    image, record = run_plan(_plan(loaded, [PLANNED] * 2), loaded, on_event=events.append,
                             faults=testhooks.OomFaults(phase, nth))
    assert fingerprint(loaded.pipe) == before  # every patch of both attempts came off
    attempts = record["stages"][stage]["attempts"]
    assert [(a["phase"], a["reason"]) for a in attempts] == [(phase, f"out of memory in the {phase}")]
    assert attempts[0]["memory"] == PLANNED.to_dict()
    assert [e.stage for e in events if isinstance(e, Retrying)] == [stage]
    ran = [MemoryPlan(**s["memory"]) for s in record["stages"]]
    assert ran[stage] != PLANNED and ran[1 - stage] == PLANNED
    assert attempts[0]["retry"]["memory"] == ran[stage].to_dict()
    if phase == "unet":  # aimed at the phase that ran out: UNet knobs, the VAE's untouched
        assert (ran[stage].cfg_split, ran[stage].band_rows, ran[stage].vae_tile_px) == (True, 64, 0)
    else:
        assert ran[stage].vae_tile_px == 64 and ran[stage].knobs().cfg_split is False
    assert record["stages"][stage]["memory_in_effect"]["cfg_split"] == ran[stage].cfg_split
    direct, _ = run_plan(_plan(loaded, ran), loaded)  # planned with what finally ran, no fault
    assert np.abs(image.astype(int) - direct.astype(int)).max() <= 1


def test_out_of_memory_on_every_attempt_ends_in_one_error_naming_stage_phase_and_budget(loaded):
    before = fingerprint(loaded.pipe)
    finished = []
    with pytest.raises(OutOfMemoryError) as caught:
        run_plan(_plan(loaded, [PLANNED] * 2), loaded, faults=testhooks.OomFaults("vae_encode", None),
                 on_event=lambda e: isinstance(e, StageFinished) and finished.append(e.stage))
    message = str(caught.value)
    assert "\n" not in message
    # untiled, then 64 px tiles (the retry floor; SiLU is in place already): no tighter plan left
    assert message.startswith("stage 2 (128x128) ran out of device memory in the VAE encode 2 time(s), "
                              "the last with offload=none, vae_tile_px=64,")
    assert "smallest budget tried: no budget set" in message
    assert finished == [0]  # stage 1 was handed on before stage 2 failed
    assert fingerprint(loaded.pipe) == before


def test_a_run_after_a_recovered_one_runs_with_no_patch_left(loaded):
    reference, _ = run_plan(_plan(loaded, [PLANNED] * 2), loaded)
    faults = testhooks.OomFaults("unet", 2)  # one fault object across runs, as a batch has
    run_plan(_plan(loaded, [PLANNED] * 2), loaded, faults=faults)
    image, record = run_plan(_plan(loaded, [PLANNED] * 2), loaded, faults=faults)
    assert [s["attempts"] for s in record["stages"]] == [[], []]
    assert all(s["memory_in_effect"]["cfg_split"] is False for s in record["stages"])
    assert np.array_equal(image, reference)


def test_every_undo_runs_when_one_fails_and_the_first_failure_is_raised():
    done = []
    handle = KnobHandle()
    handle.add(lambda: done.append("first"))
    handle.add(lambda: (_ for _ in ()).throw(RuntimeError("second undo broke")))
    handle.add(lambda: done.append("third"))
    handle.add(lambda: (_ for _ in ()).throw(ValueError("fourth undo broke")))
    with pytest.raises(ValueError, match="fourth undo broke") as caught:
        handle()
    assert done == ["third", "first"]  # last applied, first undone; none skipped
    assert any("second undo broke" in note for note in caught.value.__notes__)
    handle()  # nothing left to undo


@pytest.mark.parametrize("exc,oom", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), True),
    (RuntimeError("shape mismatch"), False), (ValueError("out of memory"), False)])
def test_out_of_memory_is_known_in_each_of_its_forms(exc, oom):
    assert is_oom(exc) is oom


def test_the_hook_is_inert_without_the_switch_and_refuses_a_bad_spec(monkeypatch):
    from linfusion_cli.errors import InputError

    monkeypatch.setenv(testhooks.OOM, "*:unet:1")
    monkeypatch.delenv(testhooks.ENABLE, raising=False)
    assert testhooks.oom_faults(0) is None
    monkeypatch.setenv(testhooks.ENABLE, "1")
    assert testhooks.oom_faults(3).strike("unet")
    monkeypatch.setenv(testhooks.OOM, "1:unet:*")
    assert testhooks.oom_faults(0) is None and testhooks.oom_faults(1).strike("unet")
    monkeypatch.setenv(testhooks.OOM, "0:vae:1")
    with pytest.raises(InputError, match="RANK:PHASE:N"):
        testhooks.oom_faults(0)


def test_nan_is_retried_in_native_bf16_else_in_float32_else_not_at_all(monkeypatch):
    from linfusion_cli.pipeline import finite

    from ..model_helpers import bare_model

    model = bare_model(device="cuda", dtype=torch.float16, vae_dtype=torch.bfloat16)
    monkeypatch.setattr(finite, "native_bf16", lambda device: True)  # an Ampere or later GPU
    assert finite.retry_dtype(model, "unet") == torch.bfloat16  # fp16's bytes, fp32's range
    assert finite.retry_dtype(model, "vae") == torch.float32
    monkeypatch.setattr(finite, "native_bf16", lambda device: False)  # a T4: bf16 only emulated
    assert finite.retry_dtype(model, "unet") == torch.float32
    model.dtype = torch.float32
    assert finite.retry_dtype(model, "unet") is None


def test_nan_in_bf16_is_retried_in_float32_under_a_plan_tightened_for_four_bytes(tiny_pipeline_dirs):
    model = load_model(str(tiny_pipeline_dirs["sd15"]), linfusion="fresh", family="sd15", dtype="bf16")
    conv = model.pipe.vae.decoder.conv_out  # NaN in stage 2's decode while the VAE is not float32

    def poison(m, i, o):
        return o * float("nan") if m.weight.dtype != torch.float32 and o.shape[-1] == 128 else o
    hook = conv.register_forward_hook(poison)
    try:
        events = []
        image, record = run_plan(_plan(model, [PLANNED] * 2), model, on_event=events.append)
    finally:
        hook.remove()
    attempts = record["stages"][1]["attempts"]
    assert [(a["phase"], a["reason"], a["retry"]["dtype"]) for a in attempts] == \
        [("vae", "NaN/inf from the VAE", "fp32")]
    assert attempts[0]["retry"]["memory"] == record["stages"][1]["memory"]
    assert record["stages"][1]["memory"]["vae_tile_px"] == 64  # the VAE's values twice as large
    assert record["vae_dtype"] == "fp32" and image.max() > 0
    assert "retrying it in float32 under a plan tightened for 4-byte values" in \
        next(e.reason for e in events if isinstance(e, Retrying))


def test_the_failed_attempts_activations_are_gone_before_memory_is_freed(loaded, monkeypatch):
    import weakref

    from linfusion_cli.pipeline import orchestrator, recovery

    seen, alive = [], []  # the UNet inputs the pipeline's frame held when the fault struck
    take = loaded.pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(weakref.ref(args[0])))
    real = recovery.release
    monkeypatch.setattr(orchestrator.recovery, "release", lambda device: (
        alive.append(seen[-1]() is not None), real(device)))
    try:
        run_plan(_plan(loaded, [PLANNED] * 2), loaded, faults=testhooks.OomFaults("unet", 2))
    finally:
        take.remove()
    assert alive == [False, False]  # before the undo and after it: the traceback let go first


def test_out_of_memory_while_the_plan_is_taken_off_is_one_error(loaded, monkeypatch):
    from linfusion_cli.pipeline import knobs

    real = knobs.KnobHandle.__call__

    def undo(handle):
        real(handle)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
    monkeypatch.setattr(knobs.KnobHandle, "__call__", undo)
    with pytest.raises(OutOfMemoryError, match=r"^stage 1 \(64x64\) ran out of device memory while its "
                                               r"memory plan was put on or taken off$"):
        run_plan(_plan(loaded, [PLANNED] * 2), loaded)


def test_weights_load_where_the_plan_puts_them(loaded, tiny_pipeline_dirs):
    from dataclasses import replace

    from linfusion_cli import api

    offloaded = _plan(loaded, [replace(PLANNED, offload="model")] * 2)
    assert api.loading_on_host(offloaded)
    assert not api.loading_on_host(_plan(loaded, [PLANNED, replace(PLANNED, offload="model")]))
    model = load_model(str(tiny_pipeline_dirs["sd15"]), linfusion="fresh", family="sd15", on_host=True)
    image, _ = run_plan(offloaded, model)  # the plans bring the models to the device and back
    reference, _ = run_plan(_plan(loaded, [PLANNED] * 2), loaded)
    assert np.array_equal(image, reference)
