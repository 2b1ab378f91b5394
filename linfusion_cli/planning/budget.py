"""The memory budget a plan is made for, and where the figure came from: one value that the
planner plans against, a refusal quotes, `--dry-run` prints and the record keeps."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2 ** 30


@dataclass(frozen=True)
class Budget:
    """GiB the stages may use on the plan's device (None: no figure, the fastest plan)."""

    gib: float | None
    source: str  # "--max-vram", "preset X's max_vram", "the free memory of cuda:0", "a quarter of RAM", "none"
    asked: bool = False  # given by the user (flag or preset), not read off this machine

    @classmethod
    def given(cls, gib: float, source: str) -> Budget:
        return cls(gib=gib, source=source, asked=True)

    @property
    def bytes(self) -> int | None:
        return None if self.gib is None else int(self.gib * GIB)

    def too_small(self) -> str:
        """The end of a refusal: the budget as the user gave it, or where it came from."""
        if self.asked:
            return f"{self.source} {self.gib:g} is too small"
        if self.source.startswith("the free memory"):
            return f"{self.source} ({self.gib:.1f} GiB) is too small; free some, or lower the size"
        if self.gib is None:
            return ""
        return (f"no GPU found; on the CPU the budget is {self.source}, {self.gib:.1f} GiB; "
                "pass --max-vram to allow more")

    def describe(self) -> str:
        """For --dry-run's first line."""
        if self.gib is None:
            return "no budget given (the fastest plan; pass --max-vram)"
        return f"{self.gib:g} GiB ({self.source})"

    def to_dict(self) -> dict:
        return {"gib": self.gib, "source": self.source}


def vae_device_budget(budget_bytes: int | None, estimated_peak_gib: float) -> int | None:
    """Device bytes the exact tiled VAE's paused tiles may hold: what the stage's plan leaves of
    the budget (its estimate counts one running tile; paused ones beyond this park on the host).
    None without a budget (the tiled VAE then takes a share of the memory free when it starts)."""
    if budget_bytes is None:
        return None
    return max(0, budget_bytes - int(estimated_peak_gib * GIB))
