"""Hostile and malformed inputs: each class ends in one clear error (or a clean edit), quickly,
with no traceback and nothing raw echoed to the terminal."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import save_png, write_spec
from PIL import Image
from typer.testing import CliRunner

from dragonctl.cli import app

runner = CliRunner()


def _validate_in_a_process(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """A process of its own, so an input that hangs fails the test instead of stalling it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dragonctl", "validate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _move(workdir: Path, name: str = "m.yaml", **over) -> Path:
    fields = dict(image="src.png", mode="move", mask={"box": [8, 10, 24, 26]}, offset=[12, 2])
    return write_spec(workdir, name, **{**fields, **over})


def test_a_fifo_or_an_endless_device_is_refused_unread(workdir):
    os.mkfifo(workdir / "pipe.png")
    os.mkfifo(workdir / "pipe.yaml")
    (workdir / "zero.png").symlink_to("/dev/zero")
    _move(workdir, "a.yaml", image="pipe.png")
    _move(workdir, "b.yaml", image="zero.png")
    r = _validate_in_a_process(*(str(workdir / n) for n in ("a.yaml", "b.yaml", "pipe.yaml")))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("not a regular file") == 3, r.stderr


@pytest.mark.parametrize(
    "where", ["mode: *i", "version: *i", "guidance: {energy_scale: *i}", "guidance: *i"]
)
def test_an_alias_bomb_is_reported_in_a_line(workdir, where):
    bomb = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    bomb += [
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]"
        for p, c in zip("abcdefgh", "bcdefghi")
    ]
    fields = {"version": "version: 1", "mode": "mode: move", "guidance": ""}
    fields[where.split(":")[0]] = where
    spec = workdir / "bomb.yaml"
    spec.write_text(
        "\n".join(["x:", *("  " + line for line in bomb), "image: src.png", *fields.values()])
        + "\n"
    )
    r = _validate_in_a_process(str(spec))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr) < 2000, r.stderr
    assert where.split(":")[0] in r.stderr


def test_deep_nesting_and_odd_paths_are_clean_errors(workdir):
    deep = workdir / "deep.yaml"
    deep.write_text("version: 1\nimage: src.png\nmode: move\nguidance: " + "[" * 600 + "]" * 600)
    _move(workdir, "nul.yaml", mask="a\0b.png")
    _move(workdir, "home.yaml", image="~nosuchuser12345/x.png")
    r = runner.invoke(
        app, ["validate", str(deep), str(workdir / "nul.yaml"), str(workdir / "home.yaml")]
    )
    assert r.exit_code == 2 and r.exception is None or isinstance(r.exception, SystemExit)
    assert f"{deep}: guidance: nested more than 32 levels deep" in r.output
    assert "nul.yaml: mask: cannot read" in r.output
    assert "home.yaml: image: file not found" in r.output


def test_values_reach_the_terminal_escaped_and_short(workdir):
    spec = _move(workdir, "m.yaml", **{"evil\x1b[31m\nok  forged.yaml": 1, "mode": "x" * 200_000})
    r = runner.invoke(app, ["validate", str(spec)])
    assert r.exit_code == 2
    assert "\x1b" not in r.output and "\nok  forged.yaml" not in r.output
    assert len(r.output) < 2000


@pytest.mark.parametrize(
    "text,where",
    [
        ("version: 1\nimage: src.png\nmode: move\nmode: drag\n", "given twice"),
        ("version: true\nimage: src.png\nmode: move\n", "version"),
    ],
)
def test_yaml_that_is_accepted_though_wrong_is_refused(workdir, text, where):
    spec = workdir / "w.yaml"
    spec.write_text(text + "mask: {box: [8, 10, 24, 26]}\noffset: [1, 0]\n")
    r = runner.invoke(app, ["validate", str(spec)])
    assert r.exit_code == 2 and where in r.output, r.output


@pytest.mark.parametrize(
    "over,field,reason",
    [
        (dict(model=""), "model", "at least 1 character"),
        (dict(guidance={"inject_from": 0.8, "inject_until": 0.5}), "guidance", "inject_from"),
        (dict(guidance={"sde_from": 0.5, "sde_until": 0.2}), "guidance", "sde_from"),
        (dict(mask={"polygon": [[1, 1], [5, 5], [9, 9]]}), "mask", "no area"),
    ],
)
def test_settings_that_cannot_mean_anything_are_refused(workdir, over, field, reason):
    r = runner.invoke(app, ["validate", str(_move(workdir, **over))])
    assert r.exit_code == 2 and f": {field}" in r.output and reason in r.output, r.output


def test_a_16_bit_greyscale_png_keeps_its_greys(workdir):
    from dragonctl.inputs import read_image

    grey = np.full((16, 16), 32768, dtype=np.uint16)
    grey[:, 8:] = 16384
    Image.fromarray(grey).save(workdir / "g16.png")
    arr, _ = read_image(workdir / "g16.png", workdir / "x.yaml", "image")
    assert arr.shape == (16, 16, 3)
    assert abs(int(arr[0, 0, 0]) - 128) <= 1 and abs(int(arr[0, 15, 0]) - 64) <= 1


def test_a_broken_cache_is_warned_about_and_the_edit_goes_on(tiny_sd, workdir):
    (workdir / "cachefile").write_text("not a folder")
    spec = _move(workdir, model=str(tiny_sd), steps=2, resolution=32)
    r = runner.invoke(app, ["edit", str(spec), "--cache-dir", str(workdir / "cachefile")])
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and "editing without it" in r.output
    assert (workdir / "m.edited.png").exists()


def test_skip_existing_over_an_output_whose_metadata_is_not_a_record(tiny_sd, workdir):
    from PIL.PngImagePlugin import PngInfo

    spec = _move(workdir, model=str(tiny_sd), steps=2, resolution=32)
    info = PngInfo()
    info.add_text("Software", "dragonctl")
    info.add_itxt("dragonctl", "[1, 2, 3]")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(workdir / "m.edited.png", pnginfo=info)
    r = runner.invoke(app, ["edit", str(spec), "--no-cache", "--skip-existing"])
    assert r.exit_code == 0 and "skipped" not in r.output, r.output


def test_protocol_2_dragbench_pickles_of_numpy_masks_import(tmp_path):
    from dragonctl.dragbench_import import import_dragbench

    folder = tmp_path / "src" / "cat" / "s1"
    folder.mkdir(parents=True)
    save_png(folder / "original_image.png", np.full((40, 64, 3), 120, dtype=np.uint8))
    mask = np.zeros((40, 64), dtype=np.uint8)
    mask[5:30, 10:50] = 1
    payload = {"prompt": "x", "points": [[20, 10], [30, 12]], "mask": mask}
    (folder / "meta_data.pkl").write_bytes(pickle.dumps(payload, protocol=2))
    written, failed = import_dragbench(tmp_path / "src", tmp_path / "out")
    assert not failed and len(written) == 1


def test_a_malformed_dragbench_sample_is_skipped_and_the_import_goes_on(tmp_path):
    from dragonctl.dragbench_import import import_dragbench

    for name, points in (("bad", {"x": object.__name__}), ("good", [[20, 10], [30, 12]])):
        folder = tmp_path / "src" / "cat" / name
        folder.mkdir(parents=True)
        save_png(folder / "original_image.png", np.full((40, 64, 3), 120, dtype=np.uint8))
        mask = np.ones((40, 64), dtype=np.uint8)
        (folder / "meta_data.pkl").write_bytes(
            pickle.dumps({"prompt": "x", "points": points, "mask": mask})
        )
    written, failed = import_dragbench(tmp_path / "src", tmp_path / "out")
    assert [p.stem for p in written] == ["good"] and len(failed) == 1 and "bad" in failed[0]


@pytest.mark.parametrize(
    "over,field",
    [
        (dict(offset=[1.7e308, 1.7e308]), "offset"),
        (dict(scale=1e-300), "scale"),
        (dict(mask={"circle": [1e300, 5, 3]}), "mask"),
    ],
)
def test_absurd_numbers_are_errors_not_numpy_warnings(workdir, over, field):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a leaked RuntimeWarning fails the test
        r = runner.invoke(app, ["validate", str(_move(workdir, **over))])
    assert r.exit_code == 2 and f": {field}" in r.output, r.output


def test_a_pickle_of_shared_references_is_refused_before_it_expands(tmp_path):
    from dragonctl.dragbench_import import safe_load_pickle

    row = [0] * 1000
    bomb = [row] * 1000
    bomb = [bomb] * 1000  # a few KB pickled, a billion items expanded
    data = pickle.dumps({"prompt": "x", "points": bomb, "mask": np.zeros((2, 2))})
    assert len(data) < 20_000
    with pytest.raises(pickle.UnpicklingError, match="once expanded"):
        safe_load_pickle(data)


def test_a_read_only_cache_is_warned_about_and_the_edit_goes_on(tiny_sd, workdir, monkeypatch):
    import dragonctl.cache as cache_module

    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache_module, "atomic_write", refuse)  # root ignores permissions
    (workdir / "cache" / "trajectories").mkdir(parents=True)
    spec = _move(workdir, model=str(tiny_sd), steps=2, resolution=32)
    r = runner.invoke(app, ["edit", str(spec), "--cache-dir", str(workdir / "cache")])
    assert r.exit_code == 0 and "cannot be written" in r.output, r.output


def test_validate_costs_a_few_bytes_per_pixel(workdir):
    import tracemalloc

    from dragonctl import api

    side = 1500
    save_png(workdir / "big.png", np.full((side, side, 3), 90, dtype=np.uint8))
    spec = _move(
        workdir,
        "big.yaml",
        image="big.png",
        mask={"box": [100, 100, 900, 900], "dilate": 256},
        offset=[200, 100],
        scale=1.2,
    )
    tracemalloc.start()
    rep = api.validate([spec])[0]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rep.ok, rep.errors
    # bytes per pixel: 239 before (a read buffer of the 512 MiB cap, float64 coordinate grids)
    assert peak / side**2 < 40, peak / side**2


def test_a_report_stays_small_whatever_the_spec(workdir):
    spec = _move(workdir, **{f"field{i}": "x" * 100 for i in range(5000)})
    r = runner.invoke(app, ["validate", str(spec)])
    assert r.exit_code == 2 and "more problems" in r.output and len(r.output) < 64_000


def test_a_directory_where_a_cache_entry_should_be_is_a_warning(tmp_path):
    import torch

    from dragonctl.cache import TrajectoryCache, TrajectoryKey

    cache = TrajectoryCache(tmp_path)
    key = TrajectoryKey.of(b"img", {"model": "m"}, {}, (8, 8), 4, "")
    cache._path(key).mkdir(parents=True)
    assert cache.get(key) is None and cache.warnings
    cache.put(key, torch.zeros(4))  # cannot replace the directory either: a warning, no error
    assert any("editing without" in w for w in cache.warnings)
