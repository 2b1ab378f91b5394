"""README's memory table, from the planner itself: which sizes fit which GPU budgets.

Each cell plans the whole ladder (the family's preset: base at the trained short side, x2
stages) for a CUDA GPU of that many GiB in fp16 with the VAE in bf16, and prints "fits (peak)"
with the largest stage estimate, or "needs N" with the smallest budget any plan needs.
Estimates, not measurements.

    python -m benchmarks.memory_table
"""

from __future__ import annotations

from linfusion_cli.errors import PlanError
from linfusion_cli.planning.memory.planner import BudgetError
from linfusion_cli.planning.memory.planner import choose_knobs
from linfusion_cli.planning.resolve import DTYPE_BYTES
from linfusion_cli.planning.request import Request, make_plan, add_memory_plans

BUDGETS = (8, 12, 24, 80)
ROWS = [("SD1.5", "sd15", 4096, 4096), ("SD1.5", "sd15", 8192, 8192),
        ("SD1.5", "sd15", 16384, 8192), ("SD-XL", "sdxl", 8192, 8192),
        ("SD-XL", "sdxl", 16384, 8192), ("SD-XL", "sdxl", 16384, 16384)]


def cell(preset: str, width: int, height: int, budget: float) -> str:
    request = Request(prompt="x", preset=preset, width=width, height=height, max_vram=budget,
                      device="cuda", dry_run=True)
    plan = make_plan(request)
    try:
        plan = add_memory_plans(plan)
    except PlanError:
        return f"needs {smallest_budget(plan):.1f}"
    peak = max(s.memory.estimated_peak_gib for s in plan.stages)
    return f"fits ({peak:.1f})"


def smallest_budget(plan) -> float:
    """GiB the tightest plan of the hungriest stage needs."""
    info, needed = plan.model_info, 0
    for stage in plan.stages:
        try:
            choose_knobs(info.unet_config, info.vae_config, width=stage.width, height=stage.height,
                       dtype_bytes=DTYPE_BYTES[plan.dtype], vae_bytes=DTYPE_BYTES[plan.vae_dtype],
                       budget_bytes=1, guidance=stage.guidance > 1, device="cuda")
        except BudgetError as exc:
            needed = max(needed, exc.needed_bytes)
    return needed / 2 ** 30


def main() -> None:
    print("| | " + " | ".join(f"{b} GiB" for b in BUDGETS) + " |")
    print("|---" * (len(BUDGETS) + 1) + "|")
    for name, preset, width, height in ROWS:
        size = f"{width}^2" if width == height else f"{width}x{height}"
        print(f"| {name} {size} | " + " | ".join(cell(preset, width, height, b) for b in BUDGETS) + " |")


if __name__ == "__main__":
    main()
