"""Band parallelism (linfusion_cli/parallel) against one process: the UNet (SD1.5 and SD-XL
shapes, unequal bands, DemoFusion's dilated pass, parked skips, a ControlNet) over 2 and 3
gloo processes on the CPU equals the single-process forward (1e-5 relative), and every rank
ends with the same whole output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from linfusion_cli.parallel import bands, check_split, level_heights

from .helpers import run_ranks

TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------- the layout (pure)

def test_bands_cut_at_the_coarsest_level_and_cover_every_level():
    parts = bands(45, 3, 3)  # heights 45, 23, 12, 6: odd sizes on the way down
    assert level_heights(45, 3) == [45, 23, 12, 6]
    for level, h in enumerate(level_heights(45, 3)):
        ranks = parts[level]
        assert ranks[0][0] == 0 and ranks[-1][1] == h
        assert all(ranks[i][1] == ranks[i + 1][0] for i in range(2))
        assert all(a < b for a, b in ranks)
    assert parts[3] == [(0, 2), (2, 4), (4, 6)] and parts[0][1] == (16, 32)


def test_too_many_ranks_for_the_coarsest_level_is_one_line():
    with pytest.raises(ValueError, match="at least 5 latent rows at the UNet's coarsest level, which has 4"):
        check_split(32, 3, 5)
    with pytest.raises(ValueError, match="at least 1"):
        check_split(32, 3, 0)


# ---------------------------------------------------------------- the UNet over processes

def _models():
    """Tiny LinFusion UNets (and ControlNets), the same weights on every process."""
    from diffusers import ControlNetModel

    from linfusion_cli.adapters.controlnet import prepare_controlnet

    from ..model_helpers import linfusion_unet

    out = {}
    for family in ("sd15", "sdxl"):
        unet = linfusion_unet(family)
        torch.manual_seed(3)
        net = ControlNetModel.from_unet(type(unet).from_config(unet.config)).eval()
        with torch.no_grad():
            for p in list(net.controlnet_down_blocks.parameters()) + list(net.controlnet_mid_block.parameters()):
                nn.init.normal_(p, std=0.1)
        out[family] = (unet, prepare_controlnet(net, unet))
    return out


def _cases(models, group):
    """name -> the UNet output (B, 4, H, W) with `group` (None: one process)."""
    import contextlib

    from linfusion_cli.bands.controlnet_forward import banded_controlnet_forward
    from linfusion_cli.bands.unet_forward import banded_forward
    from linfusion_cli.pipeline.demofusion import dilated_convs

    from ..model_helpers import unet_inputs

    out = {}
    with torch.no_grad():
        for family, h, w, rows, park, dilation, control in (
                ("sd15", 24, 16, 4, False, 1, False), ("sd15", 40, 8, 64, True, 2, False),
                ("sdxl", 24, 24, 3, True, 3, False), ("sd15", 24, 16, 5, False, 1, True),
                ("sdxl", 16, 16, 64, True, 1, True),
                ("sd15", 24, 16, None, True, 1, True)):  # None: one band per level (no band_rows)
            unet, net = models[family]
            sample, t, context, kwargs = unet_inputs(unet, h, w)
            ctl = None
            if control:
                cond = torch.rand(2, 3, h * 8, w * 8, generator=torch.Generator().manual_seed(2))
                ctl = lambda batch: banded_controlnet_forward(
                    net, rows, park, sample, t, context, cond, 0.7, **kwargs, return_dict=False,
                    group=group)
            dilated = dilated_convs(unet, dilation) if dilation > 1 else contextlib.nullcontext()
            with dilated:
                out[f"{family}-{h}x{w}-r{rows}-d{dilation}-c{int(control)}"] = banded_forward(
                    unet, rows, park, sample, t, context, **kwargs, control=ctl, group=group).sample
    return out


def _traffic(models, rank: int, size: int) -> tuple[dict, dict]:
    """(bytes sent in one real forward, bytes parallel.traffic predicts without sending any)."""
    from linfusion_cli.bands.unet_forward import banded_forward
    from linfusion_cli.parallel import BandGroup
    from linfusion_cli.parallel.traffic import step_traffic

    from ..model_helpers import unet_inputs

    unet = models["sd15"][0]
    sample, t, context, _ = unet_inputs(unet, 40, 8)
    group = BandGroup(rank, size)
    with torch.no_grad():
        banded_forward(unet, 4, False, sample, t, context, group=group)
    return dict(group.sent), step_traffic(unet, sample, t, context, size=size, rank=rank, band_rows=4)


def _worker(rank: int, size: int, folder: str) -> None:
    from linfusion_cli.parallel import BandGroup

    models = _models()
    group = BandGroup(rank, size)
    got = _cases(models, group)
    traffic = _traffic(models, rank, size)
    torch.save({"out": got, "sent": dict(group.sent), "traffic": traffic}, f"{folder}/rank{rank}.pt")
    if rank == 0:
        torch.save(_cases(models, None), f"{folder}/single.pt")


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.slow
def test_unet_over_ranks_equals_one_process(tmp_path, size):
    run_ranks(size, _worker, str(tmp_path))
    single = torch.load(tmp_path / "single.pt")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(size)]
    for name, reference in single.items():
        for r in ranks:
            assert r["out"][name].shape == reference.shape
            assert _rel(r["out"][name], reference) < TOL, (name, _rel(r["out"][name], reference))
        assert all(torch.equal(r["out"][name], ranks[0]["out"][name]) for r in ranks)
    for r in ranks:  # every kind of message crossed, and the counting group predicts each count
        assert all(r["sent"].get(kind, 0) > 0 for kind in ("halo", "moments", "key_state", "gather"))
        sent, predicted = r["traffic"]
        assert sent == predicted


@pytest.mark.parametrize("height,levels,size", [(64, 3, 8), (1024, 3, 8), (45, 3, 3), (128, 2, 4)])
def test_planner_rows_per_rank_follow_the_layout(height, levels, size):
    """The planner (torch-free) sizes a rank's UNet maps by the layout's largest band plus halos."""
    from linfusion_cli.planning.memory.estimate import HALO_ROWS, rank_latent_rows

    config = {"down_block_types": ["D"] * (levels + 1)}
    largest = max(b - a for a, b in bands(height, levels, size)[0])
    assert rank_latent_rows(config, height, size) == min(height, largest + HALO_ROWS)
    assert rank_latent_rows(config, height, 1) == height


@pytest.mark.parametrize("family,rows,knobs,size", [
    ("sd15", 32, dict(cfg_split=True, skips_on_cpu=True, inplace=True), 4),
    ("sdxl", 0, {}, 4), ("sd15", 0, {}, 8)])
@pytest.mark.slow  # a full-size meta trace or several runs: not the quick tier
def test_per_rank_estimate_against_a_trace_of_one_rank(family, rows, knobs, size):
    """The planner's per-rank UNet bytes against a meta-device trace of rank 1's band-parallel
    forward (parallel.traffic's counting group: halo buffers and the gathered output are real
    tensors there): never under by more than 5%, over by at most 30% (the halo allowance)."""
    from linfusion_cli.parallel.traffic import CountingGroup
    from linfusion_cli.planning.memory import estimate as est
    from linfusion_cli.planning.memory.planner import MemoryPlan, load_family_configs
    from linfusion_cli.tracing.unet import meta_unet, trace_unet_bytes

    unet_cfg, _ = load_family_configs(family)
    plan = MemoryPlan(offload="model", attn_chunk=65536, band_rows=rows, **knobs)
    traced = trace_unet_bytes(unet_cfg, width=2048, height=2048, knobs=plan,
                              unet=meta_unet(unet_cfg, linfusion=True), group=CountingGroup(1, size, "meta"))
    estimated = est.unet_activation_bytes(
        unet_cfg, latent_h=est.rank_latent_rows(unet_cfg, 256, size), latent_w=256, batch=2,
        dtype_bytes=2, knobs=plan, banded=True) + est.gathered_bytes(
            unet_cfg, latent_h=256, latent_w=256, dtype_bytes=2, batch=2)
    assert 0.95 <= estimated / traced <= 1.3, (estimated, traced)


# ---------------------------------------------------------------- the group's ending

def _ending_worker(rank: int, size: int, out: str, fail_rank: int) -> None:
    import os

    import torch.distributed as dist

    from linfusion_cli.parallel import GroupError, band_parallel

    os.environ["LINFUSION_GROUP_TIMEOUT"] = "120"
    what, seen = "finished", None
    try:
        with band_parallel(rank, size, "cpu") as group:
            seen = group
            group.all_reduce(torch.ones(3), "moments")
            if rank == fail_rank:
                raise ValueError("this rank's entry failed")
    except ValueError:
        what = "raised"
    except GroupError:
        what = "group error"
    registered = seen.pg in dist.distributed_c10d._world.pg_map
    with open(f"{out}/rank{rank}", "w") as f:
        f.write(f"{what} closed={seen.closed} registered={registered}")


@pytest.mark.parametrize("fail_rank", [-1, 1])
@pytest.mark.slow
def test_the_group_is_shut_down_when_the_run_ends_and_a_failed_rank_stops_the_others(tmp_path, fail_rank):
    """A finished run meets at a barrier, then shuts the group down (not left to the interpreter's
    exit); a rank that fails shuts its side down at once, and its peer, waiting at the barrier,
    stops with a GroupError instead of waiting out the group's timeout."""
    run_ranks(2, _ending_worker, str(tmp_path), fail_rank)
    got = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    after = "closed=True registered=False"
    if fail_rank < 0:
        assert got == [f"finished {after}"] * 2
    else:
        assert got == [f"group error {after}", f"raised {after}"]
