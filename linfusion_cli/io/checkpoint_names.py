"""Where a stage checkpoint of an output lives: `.x.png.stageK-WxH.png` beside `x.png` (hidden),
or `x.png.stageK-WxH.png` when --save-stages keeps it; the output's whole name is in it, so
`x.png` and `x.jpg` never share one. Earlier versions used the stem (`.x.stageK-WxH.png`)."""

from __future__ import annotations

import re
from pathlib import Path

NAME = re.compile(r"^(?P<hidden>\.?)(?P<stem>.+)\.stage(?P<k>\d+)-(?P<w>\d+)x(?P<h>\d+)\.png$")


def stage_path(final: Path | None, index: int, width: int, height: int) -> Path:
    """Where --save-stages keeps stage `index`: beside the final file, named after all of its
    name (x.png and x.jpg never share a checkpoint)."""
    base = final if final is not None else Path.cwd() / "stdout"
    return base.with_name(f"{base.name}.stage{index + 1}-{width}x{height}.png")


def hidden_path(final: Path, index: int, width: int, height: int) -> Path:
    """The hidden twin of the --save-stages file: the checkpoint when stages are not kept."""
    visible = stage_path(final, index, width, height)
    return visible.with_name("." + visible.name)


def legacy_paths(final: Path, index: int, width: int, height: int) -> list[Path]:
    """The names of earlier versions (the output's stem, not its name: `.x.stage1-64x64.png`):
    read by --resume when their settings match, removed once the image is made; never written."""
    name = f"{final.stem}.stage{index + 1}-{width}x{height}.png"
    return [final.with_name("." + name), final.with_name(name)]


def checkpoint_path(final: Path, stage, keep: bool) -> Path:
    """Where a run writes stage `stage`'s checkpoint: the stage file when kept, else hidden."""
    where = stage_path if keep else hidden_path
    return where(final, stage.index, stage.width, stage.height)


def paths_of(plan, final: Path) -> list[tuple[object, Path]]:
    """(stage, path) for both names of every stage but the last (the last is the output)."""
    return [(s, where(final, s.index, s.width, s.height)) for s in plan.stages[:-1]
            for where in (hidden_path, stage_path)]


def candidates(plan, final: Path) -> list[tuple[object, Path, bool]]:
    """(stage, path, legacy) for every name --resume reads."""
    current = [(s, p, False) for s, p in paths_of(plan, final)]
    return current + [(s, p, True) for s in plan.stages[:-1]
                      for p in legacy_paths(final, s.index, s.width, s.height)]
