"""A non-editable install ships what the package reads at run time: configs and the embedded model."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("hatchling", reason="hatchling (the dev extra) builds the wheel")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True)
    return next(out.glob("dragonctl-*.whl"))


def test_wheel_holds_configs_and_weights(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"dragonctl/configs/sd15.yaml", "dragonctl/configs/shapes.yaml"} <= names
    weights = "dragonctl/shapes/weights/"
    assert {weights + "unet/diffusion_pytorch_model.safetensors", weights + "unet/config.json",
            weights + "null_prompt.safetensors", weights + "scheduler/scheduler_config.json"} <= names
    assert not any(n.startswith(("tests/", "samples/")) for n in names)


def test_installed_wheel_finds_its_packaged_files(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import dragonctl.spec as s, dragonctl.shapes.model as m;"
            "assert s.configs_dir() == __import__('pathlib').Path(s.__file__).parent / 'configs', s.configs_dir();"
            "assert s.defaults_for('shapes', 'move')['model'] == 'shapes';"
            "assert (m.WEIGHTS_DIR / 'unet' / 'diffusion_pytorch_model.safetensors').exists()")
    subprocess.run([sys.executable, "-c", code, str(target)], check=True, cwd=tmp_path)
