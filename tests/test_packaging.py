"""What the wheel ships: every package folder, and the top-level presets/ as linfusion_cli.presets."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed():
    found = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "linfusion_cli").rglob("__init__.py")}
    listed = set(_setuptools()["packages"])
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - found == {"linfusion_cli.presets"}


def test_presets_ship_from_the_top_level_folder():
    from linfusion_cli.planning.presets import bundled_folder, bundled_presets, load_preset

    config = _setuptools()
    assert config["package-dir"]["linfusion_cli.presets"] == "presets"
    assert config["package-data"]["linfusion_cli.presets"] == ["*.yaml"]
    shipped = sorted(p.stem for p in (ROOT / "presets").glob("*.yaml"))
    assert Path(str(bundled_folder())).resolve() == (ROOT / "presets").resolve()
    assert sorted(bundled_presets()) == shipped and "sd15" in shipped
    for name in shipped:
        assert load_preset(name).name == name
