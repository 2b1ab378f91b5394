"""README's memory table, from the planner itself: which sizes fit which GPU budgets.

Each cell plans the whole ladder (the family's preset: base at the trained short side, x2
stages) for a CUDA GPU of that many GiB in fp16 with the VAE in bf16, and prints "fits (peak)"
with the largest stage estimate, or "needs N" with the smallest budget the whole run fits
(`planning.memory.fit.smallest_budget`, rounded up to 0.1 GiB as the refusals quote it).
Estimates, not measurements. A row is one entry of ROWS; tests/test_readme_tables.py fails
when README.md's table differs from this output.

    python -m benchmarks.memory_table
"""

from __future__ import annotations

from linfusion_cli.errors import PlanError
from linfusion_cli.planning.memory.fit import add_memory_plans, smallest_budget
from linfusion_cli.planning.request import Request, make_plan

BUDGETS = (8, 12, 24, 80)
FAMILY_NAMES = {"sd15": "SD1.5", "sd21": "SD2.1", "sdxl": "SD-XL"}
ROWS = [("sd15", 4096, 4096), ("sd15", 8192, 8192), ("sd15", 16384, 8192), ("sd15", 16384, 16384),
        ("sdxl", 8192, 8192), ("sdxl", 16384, 8192), ("sdxl", 16384, 16384)]


def cell(preset: str, width: int, height: int, budget: float) -> str:
    request = Request(prompt="x", preset=preset, width=width, height=height, max_vram=budget,
                      device="cuda", dry_run=True)
    plan = make_plan(request)
    try:
        plan = add_memory_plans(plan)
    except PlanError:
        needed, _ = smallest_budget(plan)
        return f"needs {gib_up(needed)}"
    peak = max(s.memory.estimated_peak_gib for s in plan.stages)
    return f"fits ({peak:.1f})"


def gib_up(n: int) -> str:
    import math

    return f"{math.ceil(n / 2 ** 30 * 10 - 1e-9) / 10:.1f}"


def row_label(preset: str, width: int, height: int) -> str:
    size = f"{width}^2" if width == height else f"{width}x{height}"
    return f"{FAMILY_NAMES.get(preset, preset)} {size}"


def table(rows=ROWS, budgets=BUDGETS) -> str:
    lines = ["| | " + " | ".join(f"{b} GiB" for b in budgets) + " |",
             "|---" * (len(budgets) + 1) + "|"]
    for preset, width, height in rows:
        lines.append(f"| {row_label(preset, width, height)} | "
                     + " | ".join(cell(preset, width, height, b) for b in budgets) + " |")
    return "\n".join(lines)


def main() -> None:
    print(table())


if __name__ == "__main__":
    main()
