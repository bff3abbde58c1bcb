"""Shared fixtures: single-threaded torch, no network, tiny models built in code, scene images."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["HF_HUB_OFFLINE"] = "1"  # a test that needs the hub is a broken test
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# edits that name no cache folder write to a folder of this test process, not the user's cache
# (test processes run side by side: pyproject's addopts)
os.environ["DRAGONCTL_CACHE"] = tempfile.mkdtemp(prefix="dragonctl-test-cache-")
atexit.register(shutil.rmtree, os.environ["DRAGONCTL_CACHE"], True)

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A diffusers SD folder with tiny random components (epsilon prediction)."""
    from dragonctl.bench.synthetic import save_sd_folder

    return save_sd_folder(tmp_path_factory.mktemp("tiny_sd"), "tiny", "epsilon")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A diffusers SDXL folder with tiny random components (two text encoders, text_time)."""
    from dragonctl.bench.synthetic import save_sd_folder

    return save_sd_folder(tmp_path_factory.mktemp("tiny_sdxl"), "tiny_sdxl")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory) -> Path:
    """A diffusers SD 2.x-layout folder with tiny random components (v-prediction)."""
    from dragonctl.bench.synthetic import save_sd_folder

    return save_sd_folder(tmp_path_factory.mktemp("tiny_sd2"), "tiny_sd2", "v_prediction")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    from dragonctl.bench.synthetic import save_sd_folder

    return save_sd_folder(tmp_path_factory.mktemp("tiny_sd_v"), "tiny", "v_prediction")


def save_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def scene_image(h: int = 40, w: int = 56, box=(8, 10, 24, 26), color=(220, 40, 40)) -> np.ndarray:
    """A smooth gradient with one flat rectangle: a small, non-square source."""
    ys, xs = np.mgrid[0:h, 0:w]
    img = np.stack([60 + 100 * xs / w, 120 + 60 * ys / h, 150 + 0 * xs], axis=-1).astype(np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = color
    return img


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A folder with a source, its object mask and a reference image."""
    save_png(tmp_path / "src.png", scene_image())
    m = np.zeros((40, 56), dtype=np.uint8)
    m[10:26, 8:24] = 255
    save_png(tmp_path / "mask.png", m)
    save_png(tmp_path / "ref.png", scene_image(48, 48, (16, 16, 32, 32), (30, 200, 60)))
    return tmp_path


def write_spec(folder: Path, name: str, **fields) -> Path:
    data = {"version": 1, **fields}
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


MODE_FIELDS = {
    "move": dict(mode="move", mask="mask.png", offset=[16, 4]),
    "resize": dict(mode="resize", mask={"box": [8, 10, 24, 26]}, scale=1.25),
    "drag": dict(
        mode="drag",
        mask={"box": [0, 0, 40, 36]},
        points=[[[16, 18], [26, 18]], [[10, 12], [10, 12]]],
    ),
    "appearance": dict(
        mode="appearance",
        mask="mask.png",
        reference={"image": "ref.png", "mask": {"box": [16, 16, 32, 32]}, "prompt": "green"},
    ),
    "paste": dict(
        mode="paste",
        reference={"image": "ref.png", "mask": {"box": [14, 14, 34, 34]}},
        at=[40, 20],
        scale=0.75,
    ),
}


@pytest.fixture
def spec_for(workdir):
    """spec_for(mode, **overrides) writes a valid spec of that mode into workdir."""

    def make(mode: str, name: str | None = None, **over) -> Path:
        fields = {"image": "src.png", **MODE_FIELDS[mode], "steps": 4, "resolution": 32, **over}
        return write_spec(workdir, name or f"{mode}.yaml", **fields)

    return make
