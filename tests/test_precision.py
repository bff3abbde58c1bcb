"""fp16 guidance, and a strength that means the same at any working size: tiny SD components with
SD's VAE factor 8 (random weights), at 512² and 768²."""

from __future__ import annotations

import numpy as np
import pytest

from dragonctl import api
from dragonctl.bench import precision
from dragonctl.bench.speed import write_specs
from dragonctl.engine import Editor, loop_settings

pytestmark = pytest.mark.slow  # fp16 on a CPU at SD's sizes: CI's second stage


@pytest.fixture(scope="module")
def editors() -> dict[str, Editor]:
    return {dt: Editor(b) for dt, b in precision.bundles("tiny8", None, "cpu").items()}


@pytest.fixture(scope="module")
def move_specs(tmp_path_factory) -> dict[int, tuple]:
    out = {}
    for res in (256, 512, 768):
        folder = tmp_path_factory.mktemp(f"specs{res}")
        out[res] = api.load(write_specs(folder, res, steps=4)["move"])
    return out


@pytest.fixture(scope="module")
def first_step_gradients(editors, move_specs) -> dict[int, dict]:
    """The first guided step's gradient at SD's sizes, per dtype (fp16 on a CPU is slow: once)."""
    out = {}
    for res in (512, 768):
        ls, inp = move_specs[res]
        out[res] = {
            dt: precision.guidance_gradient(ed, ls.spec, inp, 0) for dt, ed in editors.items()
        }
    return out


def test_one_guided_step_in_fp16_agrees_with_fp32_at_512_and_768(first_step_gradients):
    for res, grads in first_step_gradients.items():
        c = precision.compare(grads["fp32"], grads["fp16"])
        assert abs(c["norm_ratio"] - 1) <= 0.05, (res, c)
        # measured 0.991 (512²) and 0.984 (768²): the fp16 forward's own rounding on random
        # weights (features at half and full latent resolution, as SD's)
        assert c["cosine"] >= 0.98, (res, c)


def test_an_fp16_edit_moves_as_far_as_the_fp32_edit(editors, move_specs):
    """A whole edit (at 256², where a CPU runs fp16 in seconds; the single step above covers SD's
    sizes)."""
    ls, inp = move_specs[256]
    effect = {dt: precision.edit_effect(ed, ls.spec, inp) for dt, ed in editors.items()}
    assert effect["fp32"] > 0.005  # the guidance does something measurable
    assert abs(effect["fp16"] / effect["fp32"] - 1) <= 0.2, effect


def test_energy_scale_gives_the_same_guidance_per_cell_at_any_working_size(
    editors, move_specs, first_step_gradients
):
    g = move_specs[512][0].spec.guidance
    gain = {res: loop_settings(g, (res // 4, res // 4), 8).energy_gain for res in (512, 768)}
    assert gain[768] == pytest.approx(2.25 * gain[512])
    assert gain[768] == pytest.approx(g.gradient_scale * 1000 * g.energy_scale)  # tuned there
    per_cell, effect = {}, {}
    for res in (512, 768):
        per_cell[res] = float(first_step_gradients[res]["fp32"].abs().mean())
        ls, inp = move_specs[res]
        effect[res] = precision.edit_effect(editors["fp32"], ls.spec, inp)
    # measured 5 % apart on these random weights (their features differ between the sizes)
    assert abs(per_cell[768] / per_cell[512] - 1) <= 0.10, per_cell
    assert abs(effect[768] / effect[512] - 1) <= 0.2, effect


def test_fp16_edits_run_on_the_cpu(tmp_path, workdir, spec_for):
    from dragonctl.bench.synthetic import save_sd_folder

    folder = save_sd_folder(tmp_path / "tiny8", "tiny8")
    spec = spec_for("drag", model=str(folder), resolution=64, steps=3)
    rep = api.edit([spec], api.EditOptions(dtype="fp16", no_cache=True))[0]
    assert rep.ok, rep.errors


def test_drag_patches_get_the_same_guidance_per_cell_at_any_working_size(editors, tmp_path):
    """Drag's patches are 3×3 cells at any size, so their term is exempt from the grid's
    normalisation. Measured on these random weights (features at half and full latent
    resolution, as SD's): the gradient at the patch cells is 4.23× stronger at 768² than at 512²
    without the exemption, 1.88× with it (move's whole-object term: 1.05×); the rest is the
    random network's own size dependence, not understood."""
    from dragonctl.geometry import patch_indices

    at_patches = {}
    for res in (512, 768):
        (tmp_path / str(res)).mkdir()
        ls, inp = api.load(write_specs(tmp_path / str(res), res, steps=4)["drag"])
        g = precision.guidance_gradient(editors["fp32"], ls.spec, inp, 0)[0].abs().sum(0)
        (hx, hy), (tx, ty) = inp.points[0]
        cells = [patch_indices(x, y, 8, tuple(g.shape)) for x, y in ((hx, hy), (tx, ty))]
        at_patches[res] = float(g.flatten()[np.concatenate(cells)].mean())
    assert at_patches[768] / at_patches[512] <= 2.0, at_patches
