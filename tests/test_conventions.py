"""What users expect of a command-line tool: `.yml`, `-h`/`--version`, honest resume, threads,
EXIF orientation, drag points inside their region, starters that run offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import save_png, scene_image
from PIL import Image
from typer.testing import CliRunner

from dragonctl import api
from dragonctl.cli import app

runner = CliRunner()


def test_yml_specs_are_accepted_everywhere(workdir, spec_for):
    spec = spec_for("move", name="m.yml", model="shapes")
    r = runner.invoke(app, ["validate", str(workdir)])  # a folder finds .yml files too
    assert r.exit_code == 0 and "m.yml" in r.output, r.output
    assert api.validate([spec])[0].ok


def test_help_version_and_negative_ages(tmp_path):
    from dragonctl import __version__

    assert runner.invoke(app, ["--version"]).output.strip() == f"dragonctl {__version__}"
    for args in (["-h"], ["edit", "-h"], ["cache", "-h"], ["bench", "-h"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0 and "Usage:" in r.output, args
    r = runner.invoke(app, ["cache", "clear", "--cache-dir", str(tmp_path), "--older-than", "-5"])
    assert r.exit_code == 2 and "≥ 0" in r.output


def test_skip_existing_redoes_an_edit_whose_inputs_changed(tiny_sd, workdir, spec_for):
    spec = spec_for("move", model=str(tiny_sd), steps=2)

    def skipped() -> bool:
        return api.edit([spec], api.EditOptions(no_cache=True, skip_existing=True))[0].skipped

    assert not skipped() and skipped()
    save_png(workdir / "src.png", scene_image(color=(40, 40, 220)))  # the source changed
    assert not skipped() and skipped()
    m = np.zeros((40, 56), dtype=np.uint8)
    m[12:26, 8:24] = 255
    save_png(workdir / "mask.png", m)  # so did the mask
    assert not skipped()


def test_the_cli_waits_passively_and_takes_a_thread_count(tiny_sd, spec_for):
    code = "import os, dragonctl.cli; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "PASSIVE"
    import torch

    spec = spec_for("move", model=str(tiny_sd), steps=2)
    try:
        assert api.edit([spec], api.EditOptions(no_cache=True, threads=2))[0].ok
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_exif_orientation_is_applied_to_sources_and_masks(workdir):
    from dragonctl.inputs import read_image

    upright = scene_image(40, 56)  # 56 wide, 40 high, a red box at the top left
    stored = np.rot90(upright, k=1)  # stored rotated, with Orientation 6 to turn it back
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(stored)).save(workdir / "rot.jpg", exif=exif, quality=95)
    arr, _ = read_image(workdir / "rot.jpg", workdir / "x.yaml", "image")
    assert arr.shape == (40, 56, 3)
    assert np.abs(arr.astype(int) - upright.astype(int)).mean() < 6


def test_drag_points_outside_the_editable_region_are_errors(workdir, spec_for):
    spec = spec_for("drag", mask={"box": [0, 0, 20, 36]}, points=[[[10, 10], [30, 10]]])
    r = runner.invoke(app, ["validate", str(spec)])
    assert (
        r.exit_code == 2
        and "points[0][1]" in r.output
        and "outside the editable region" in (r.output)
    )


def test_starters_run_offline_as_written(tmp_path):
    save_png(tmp_path / "scene.png", scene_image(64, 64))
    save_png(tmp_path / "reference.png", scene_image(64, 64, color=(30, 200, 60)))
    for mode in ("move", "resize", "drag", "appearance", "paste"):
        r = runner.invoke(
            app, ["init", mode, str(tmp_path / "scene.png"), "-o", str(tmp_path / f"{mode}.yaml")]
        )
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["validate", str(tmp_path)])
    assert r.exit_code == 0, r.output
    drag = tmp_path / "drag.yaml"
    drag.write_text(drag.read_text() + "steps: 3\n")  # the embedded model, offline
    rep = api.edit([drag], api.EditOptions(no_cache=True))[0]
    assert rep.ok, rep.errors


def test_a_device_or_dtype_that_cannot_work_is_bad_usage_at_once(spec_for):
    spec = spec_for("move", model="shapes")
    for args, said in (
        (["--dtype", "int8"], "unknown dtype"),
        (["--device", "nope"], "unknown device"),
        (["--device", "cuda:0"], "CUDA is not available"),
    ):
        r = runner.invoke(app, ["edit", str(spec), *args])
        assert r.exit_code == 2 and said in r.output and len(r.output.splitlines()) == 1, r.output


def test_loading_a_model_prints_no_accelerate_advice(tiny_sd):
    code = (
        "import sys; from dragonctl.models import load_bundle\n"
        "for model in sys.argv[1:]:\n    load_bundle(model, device='cpu')"
    )
    v2 = Path(__file__).resolve().parents[1] / "training" / "shapes-v2"  # a VAE of its own
    # the libraries' own verbosity, not the one the test suite quiets them to
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}
    models = ["shapes", str(v2), str(tiny_sd)]  # one process: the imports are most of the time
    out = subprocess.run(
        [sys.executable, "-c", code, *models], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert "accelerate" not in out.stderr and "kept in float32" not in out.stderr, out.stderr


def test_the_parameters_chunk_has_size_and_a1111s_model_hash(tiny_sd, workdir, spec_for):
    import hashlib

    spec = spec_for("move", model=str(tiny_sd), steps=2)
    rep = api.edit([spec], api.EditOptions(no_cache=True))[0]
    assert rep.ok, rep.errors
    weights = tiny_sd / "unet" / "diffusion_pytorch_model.safetensors"
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()[:10]
    with Image.open(rep.output) as img:
        text = img.text["parameters"]
    assert "Size: 56x40" in text and f"Model hash: {expected}" in text, text
    # the sidecar names both hashes: A1111's (whole file) and dragonctl's quick identity
    model = json.loads(rep.output.with_suffix(".json").read_text())["model"]
    assert model["a1111_model_hash"] == expected
    assert len(model["weights_hash"]) == 16 and model["weights_hash"][:10] != expected


def test_a_batch_says_which_spec_runs_i_of_n(tiny_sd, workdir, spec_for):
    specs = [spec_for("move", name=f"s{i}.yaml", model=str(tiny_sd), steps=2) for i in range(3)]
    started = []
    api.edit(
        specs,
        api.EditOptions(no_cache=True),
        on_start=lambda p, i, n: started.append((p.name, i, n)),
    )
    assert started == [("s0.yaml", 1, 3), ("s1.yaml", 2, 3), ("s2.yaml", 3, 3)]


def test_the_progress_bar_names_the_spec(monkeypatch):
    from pathlib import Path

    from dragonctl import cli

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar, update, started, status = cli._progress(True)
    started(Path("specs/cup.yaml"), 2, 5)
    assert [t.description for t in bar.tasks] == ["cup.yaml (2 of 5)"]
    assert bar.tasks[0].completed == 1 and bar.tasks[0].total == 5

    # on Ray: the batch's line, then one per busy worker
    bar, update, started, status = cli._progress(True)
    status(3, 1, {"node/a": "cup.yaml", "node/b": "mug.yaml"}, 6)
    status(4, 1, {"node/b": "mug.yaml"}, 6)
    lines = [t.description for t in bar.tasks]
    assert lines == ["4 done · 1 failed · 1 running", "node/b: mug.yaml"]
    assert bar.tasks[0].completed == 5 and bar.tasks[0].total == 6


def test_preview_is_readable_on_any_colour_and_size(workdir, spec_for):
    # a red mask over a red object: the fill alone would not show it; the outline does
    spec = spec_for("move", mask={"box": [8, 10, 24, 26]})
    out = workdir / "p.png"
    r = runner.invoke(app, ["preview", str(spec), "-o", str(out)])
    assert r.exit_code == 0, r.output
    img = np.asarray(Image.open(out).convert("RGB"))
    k = -(-256 // 40)  # the 56×40 source, enlarged by whole multiples to a 256-px short side
    assert img.shape[1] == 56 * k and img.shape[0] > 40 * k  # with the legend below
    assert (img[10 * k, 8 * k : 24 * k] == 255).all()  # the mask's top edge: a white line
    assert (img[10 * k - 1, 8 * k : 24 * k] == 0).all()  # and a black one just outside


def test_listing_a_folder_of_specs_is_linear(tmp_path, monkeypatch):
    from pathlib import Path

    for i in range(400):
        (tmp_path / f"s{i:03d}.yaml").write_text("version: 1\n")
    calls = []
    real = Path.resolve
    monkeypatch.setattr(
        Path, "resolve", lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    )
    found = api.expand_specs([tmp_path, tmp_path / "s001.yaml"])
    assert len(found) == 400
    assert len(calls) < 5 * 400  # was one resolve per pair of specs: 80,000 here


def test_the_notebook_api_loads_once_and_edits_in_memory(tiny_sd):
    import torch

    import dragonctl

    editor = dragonctl.Editor(str(tiny_sd), device="cpu", no_cache=True)
    source = Image.fromarray(scene_image())
    mask = np.zeros((40, 56), dtype=bool)
    mask[10:26, 8:24] = True
    steps = []
    spec = {"mode": "move", "mask": mask, "offset": [12, 2], "steps": 3, "resolution": 32}
    result = editor.edit(
        source,
        spec,
        generator=torch.Generator().manual_seed(3),
        callback=lambda i, n: steps.append((i, n)),
    )
    assert isinstance(result.image, Image.Image) and result.image.size == (56, 40)
    assert steps == [(1, 3), (2, 3), (3, 3)] and result.metadata["spec"]["seed"] == 3
    again = editor.edit(
        np.asarray(source),
        {**spec, "mask": {"box": [8, 10, 24, 26]}},
        generator=torch.Generator().manual_seed(3),
    )
    assert np.array_equal(np.asarray(again.image), np.asarray(result.image))  # same edit
    assert editor.engine is editor.session.editor(str(tiny_sd))  # loaded once


def test_import_dragonctl_stays_light():
    code = "import sys, dragonctl; assert 'torch' not in sys.modules; print(dragonctl.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_alpha_is_dropped_and_a_transparent_palette_index_keeps_its_colour(workdir):
    from dragonctl.inputs import read_image

    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    pal.info["transparency"] = 1  # index 1 is transparent, and red
    pal.save(workdir / "pal.png", transparency=1)
    arr, _ = read_image(workdir / "pal.png", workdir / "x.yaml", "image")
    assert tuple(arr[0, 0]) == (200, 30, 40)
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 120, 250)  # fully transparent, yet its colour is the image
    Image.fromarray(rgba).save(workdir / "rgba.png")
    arr, _ = read_image(workdir / "rgba.png", workdir / "x.yaml", "image")
    assert arr.shape == (16, 16, 3) and tuple(arr[0, 0]) == (10, 120, 250)
