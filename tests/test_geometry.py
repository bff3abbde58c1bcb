"""Pixel ↔ working-size ↔ latent ↔ feature-grid maps, for non-square images."""

from __future__ import annotations

import numpy as np
import pytest

from dragonctl import geometry
from dragonctl.geometry import Frame, Grids, patch_indices, place_reference


@pytest.mark.parametrize(
    "h,w,res,mult,expected",
    [
        (512, 512, 512, 64, (512, 512)),
        (512, 512, 768, 64, (768, 768)),
        (384, 512, 512, 64, (448, 576)),
        (1000, 200, 512, 64, (1152, 256)),
        (64, 64, 64, 16, (64, 64)),
        (40, 56, 32, 16, (32, 32)),
        (10, 400, 64, 16, (16, 400)),
    ],
)
def test_working_size_keeps_area_and_multiples(h, w, res, mult, expected):
    H, W = geometry.working_size(h, w, res, mult)
    assert (H, W) == expected and H % mult == 0 and W % mult == 0


@pytest.mark.parametrize(
    "h, w, expected",
    [
        (64, 64, (64, 64)),  # at resolution: unchanged
        (32, 32, (64, 64)),  # smaller: upscaled to resolution, as without a maximum
        (96, 96, (96, 96)),  # between: its own size
        (128, 128, (128, 128)),
        (256, 256, (128, 128)),  # larger than the maximum: down to it
        (64, 256, (64, 256)),  # the area decides, not the long side
    ],
)
def test_working_size_keeps_a_larger_source_up_to_max_resolution(h, w, expected):
    assert geometry.working_size(h, w, 64, 16, max_resolution=128) == expected


def test_max_resolution_not_above_resolution_changes_nothing():
    for h, w in [(32, 32), (200, 120), (512, 512)]:
        assert geometry.working_size(h, w, 64, 16, 48) == geometry.working_size(h, w, 64, 16)


def test_points_round_trip_within_half_a_pixel():
    f = Frame(333, 517, 320, 512)
    rng = np.random.default_rng(0)
    for x, y in rng.uniform(0, [517, 333], size=(50, 2)):
        bx, by = f.to_source(*f.to_work(x, y))
        assert abs(bx - x) < 0.5 and abs(by - y) < 0.5


def test_masks_reach_latent_and_feature_grids_of_a_non_square_image():
    work = np.zeros((64, 128), dtype=bool)
    work[16:32, 80:112] = True  # an object in the right half
    grids = Grids((64, 128), latent_factor=8)
    assert grids.latent_hw == (8, 16) and grids.feature_hw == (16, 32) and grids.feature_cell == 4
    lat = grids.latent(work, touch=False)
    assert lat.sum() == 2 * 4 and lat[2:4, 10:14].all()
    feat = grids.feature(work)
    assert feat.sum() == 4 * 8 and feat[4:8, 20:28].all()


def test_warp_index_matches_warp_mask():
    m = np.zeros((12, 20), dtype=bool)
    m[2:6, 3:8] = True
    out = geometry.warp_mask(m, 1.0, (5.5, 4.0), (14.5, 7.0), m.shape)
    ys, xs = np.nonzero(out)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (12, 16, 5, 8)  # moved by (+9, +3)
    iy, ix = geometry.warp_index(m.shape, m.shape, 1.0, (5.5, 4.0), (14.5, 7.0))
    took = np.zeros_like(m)
    ok = iy >= 0
    took[ok] = m[iy[ok], ix[ok]]
    assert (took == out).all()


def test_drag_patches_are_clipped_inside_the_grid_on_both_axes():
    # the reference clipped x by the height; a point at the right edge of a wide grid must stay
    # there
    idx = patch_indices(127.9, 5.0, 4.0, (8, 32))
    cols = idx % 32
    rows = idx // 32
    assert cols.max() == 31 and cols.min() == 29 and rows.min() == 0 and rows.max() == 2
    assert len(set(idx.tolist())) == 9


def test_place_reference_keeps_aspect_and_lands_at_the_point():
    ref = np.zeros((30, 50, 3), dtype=np.uint8)
    ref[5:15, 10:30] = 255  # a 20×10 object
    mask = ref[..., 0] > 0
    img, placed = place_reference(ref, mask, 0.5, (40.0, 20.0), (48, 64))
    ys, xs = np.nonzero(placed)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (35, 45, 17, 22)
    assert img.shape == (48, 64, 3) and img[20, 40].min() > 200


def test_grid_mask_touch_and_half_coverage():
    m = np.zeros((8, 8), dtype=bool)
    m[0, 0] = True
    assert geometry.grid_mask(m, 2, 2, touch=True).sum() == 1
    assert geometry.grid_mask(m, 2, 2).sum() == 0
    assert geometry.grid_mask(np.ones((8, 8), bool), 4, 4).all()
