"""A plan as the dry run's readable table: what it was planned for, the model, each stage with
its memory knobs and predicted cost, the preview and where --resume starts (the JSON form is
GenerationPlan.to_dict)."""

from __future__ import annotations

from dataclasses import asdict

from ..adapters import describe
from ..models.taesd import describe as taesd_words
from .memory.knob_table import words as knob_words
from .preview_plan import shrink_note


def plan_lines(plan, resume: dict | None = None) -> list[str]:
    """The dry run's readable table of a plan; `resume`: where --resume starts (jobs' resume_plan).
    Its lines echo names and paths a user chose: a terminal shows them made safe."""
    out = [planned_for(plan)]
    if parallel_line(plan):
        out.append(parallel_line(plan))
    out.append(f"model {plan.model} ({plan.family}: {plan.family_from}), "
               f"preset {plan.preset}, LinFusion {plan.linfusion or 'off'}, seed {plan.seed}")
    out += [f"  {line}" for line in describe(plan.adapters)]
    if plan.method_from:
        out.append(f"  method: {plan.method_from}")
    for s in plan.stages:
        kind = "text-to-image" if s.strength is None else f"img2img @{s.strength}"
        if s.method == "sdedit":
            kind += " sdedit"
        elif s.method == "demofusion":
            d = s.demofusion
            kind += (f" demofusion (dilation x{d.dilation}, cosine {d.cosine_scale_1:g}/"
                     f"{d.cosine_scale_2:g}/{d.cosine_scale_3:g}, sigma {d.gaussian_sigma:g})")
        out.append(f"  stage {s.index + 1}: {s.width}x{s.height} {kind}, {s.denoise_steps} steps, "
                   f"seed {s.seed}, {memory_line(s)}")
    if plan.preview is not None:
        out.append(preview_line(plan))
    if resume is not None:
        out += [f"resume: {note}" for note in resume.get("notes", ())]
        out.append(f"resume: {resume_text(resume)}")
    return out


def memory_line(stage) -> str:
    m = stage.memory
    if m is None:
        return ""
    knobs = [w + _vae_modes(m) if w.startswith("vae_tile=") else w for w in knob_words(asdict(m))]
    line = (f"~{m.estimated_peak_gib:.1f} GiB, host ~{m.estimated_host_gib:.1f} GiB "
            f"({', '.join(k for k in knobs if k)})")
    return line + (f", {cost_words(stage.cost)}" if stage.cost else "")


def cost_words(cost: dict) -> str:
    """A stage's predicted seconds and what crosses PCIe (and, over ranks, what one rank sends to
    its peers), for the dry run's stage line."""
    pcie = (cost["host_to_device_bytes"] + cost["device_to_host_bytes"]) / 1e9
    peers = f", to peers {cost['peer_bytes'] / 1e9:.1f} GB" if cost.get("peer_bytes") else ""
    return (f"predicted {cost['predicted_s']:.1f} s (compute {cost['compute_s']:.1f} s, "
            f"PCIe {pcie:.1f} GB{peers}, {cost['launches']} launches)")


def parallel_line(plan) -> str | None:
    """The dry run's line about band parallelism (None for one process)."""
    if plan.world_size <= 1:
        return None
    return (f"parallel: bands, world_size {plan.world_size}: every rank holds its band of rows "
            f"(GPU and host memory below are per rank; --max-vram is per GPU); a rank that waits "
            f"{plan.group_timeout_s:g} s for a peer stops the run (LINFUSION_GROUP_TIMEOUT)")


def _vae_modes(m) -> str:
    """' (decode exact, encode estimated; host 5.2 GiB)': the tiled VAE's planned statistics."""
    parts = [f"{part} {mode}" for part, mode in (("decode", m.vae_decode_mode), ("encode", m.vae_encode_mode))
             if mode]
    return f" ({', '.join(parts)}; host {m.vae_host_gib:.1f} GiB)" if parts else ""


def preview_line(plan) -> str:
    """The dry run's line about --preview: file, method, interval, size and bytes (in the stages'
    estimates above), and what the budget made smaller."""
    p = plan.preview
    method = p.method + (f" {taesd_words(p.taesd)}" if p.taesd is not None else "")
    if p.why:
        method += f" ({p.why})"
    every = f"every {p.every} steps" if p.every else "about 10 per stage"
    most = max((s.bytes for s in p.stages if s is not None), default=0)
    line = (f"preview: {p.path}, {method}, {every} and at each stage's end, long side <= {p.size} px, "
            f"~{most / 2 ** 20:.1f} MiB (in each stage's estimate)")
    note = shrink_note(p, plan.stages)
    return line + (f"; {note}" if note else "")


def resume_text(resume: dict) -> str:
    """The dry run's and the run's one line about --resume."""
    if resume["checkpoint"] is None:
        return f"no checkpoint; starts at stage 1 of {resume['stages']}"
    return (f"starts at stage {resume['start_stage']} of {resume['stages']} from "
            f"{resume['checkpoint']}")


def planned_for(plan) -> str:
    """The dry run's first line: the device, dtypes and budget the estimates are for."""
    budget = (plan.budget.describe() if plan.budget is not None
              else "no budget given (the fastest plan; pass --max-vram)")
    where = " (no GPU on this machine: planned for one)" if plan.planned_elsewhere else ""
    priced = (f"; priced for {plan.gpu}: predicted {plan.predicted_s:.1f} s in all (not measured)"
              if plan.predicted_s is not None else
              "; not priced (--gpu NAME gives predicted seconds)" if plan.planned_elsewhere else "")
    return (f"planned for {plan.device}{where}, {budget}, UNet {plan.dtype}, VAE {plan.vae_dtype}"
            f"{priced}")
