"""The package's shape: a non-editable install ships what it reads at run time (configs, the
embedded model); the layers and the module table docs/development.md draws are the tree's."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "dragonctl"
CORE = ("schedules", "inversion", "features", "attention", "energies", "sampler")


def test_the_core_imports_nothing_from_the_spec():
    code = (
        "import sys\n"
        f"for m in {CORE!r}: __import__('dragonctl.' + m)\n"
        "bad = sorted(n for n in sys.modules if n in ('dragonctl.spec', 'pydantic', 'yaml'))\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_code_map_matches_the_tree():
    text = (ROOT / "docs" / "development.md").read_text()
    table = text[text.index("| stage | module | owns |") :]
    table = table[: table.index("\n\n")]
    module_column = " ".join(row.split("|")[2] for row in table.splitlines()[2:])
    named = set(re.findall(r"`([a-z_]+(?:\.py|/))`", module_column))
    modules = {p.name for p in PKG.glob("*.py")} - {"__init__.py", "__main__.py"}
    packages = {p.name + "/" for p in PKG.iterdir() if (p / "__init__.py").exists()}
    assert named == modules | packages
    listed_modes = set(re.findall(r"`([a-z_]+)`", module_column.split("`modes/`")[1]))
    assert listed_modes == {p.stem for p in (PKG / "modes").glob("*.py")} - {"__init__"}
    assert len((ROOT / "README.md").read_bytes()) <= 25_000  # the user's guide, not a lab notebook
    assert "docs/development.md" in (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("hatchling", reason="hatchling (the dev extra) builds the wheel")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
    )
    return next(out.glob("dragonctl-*.whl"))


def test_wheel_holds_configs_and_weights(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"dragonctl/configs/sd15.yaml", "dragonctl/configs/shapes.yaml"} <= names
    weights = "dragonctl/shapes/weights/"
    assert {
        weights + "unet/diffusion_pytorch_model.safetensors",
        weights + "unet/config.json",
        weights + "null_prompt.safetensors",
        weights + "scheduler/scheduler_config.json",
    } <= names
    assert not any(n.startswith(("tests/", "samples/")) for n in names)


def test_installed_wheel_finds_its_packaged_files(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import pathlib;"
        "import dragonctl.spec as s, dragonctl.shapes.model as m;"
        "assert s.configs_dir() == pathlib.Path(s.__file__).parent / 'configs', s.configs_dir();"
        "assert s.defaults_for('shapes', 'move')['model'] == 'shapes';"
        "assert (m.WEIGHTS_DIR / 'unet' / 'diffusion_pytorch_model.safetensors').exists()"
    )
    subprocess.run([sys.executable, "-c", code, str(target)], check=True, cwd=tmp_path)
