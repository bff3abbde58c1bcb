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


def _disc_scene(gradient: bool) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:48, 0:48]
    bg = (
        np.stack([40 + 150 * xs / 48, 90 + 80 * ys / 48, 120 + 0 * xs], -1)
        if gradient
        else np.full((48, 48, 3), 110.0)
    )
    disc = (xs + 0.5 - 22) ** 2 + (ys + 0.5 - 26) ** 2 <= 7.5**2
    img = np.where(disc[..., None], np.array([230.0, 30.0, 200.0]), bg).astype(np.uint8)
    return img, disc


@pytest.mark.parametrize("gradient", [False, True])
def test_object_in_a_loose_box_is_the_object(gradient):
    img, disc = _disc_scene(gradient)
    box = geometry.box_mask([11, 15, 34, 38], 48, 48)  # 3-4 px of background around the disc
    found = geometry.object_in_mask(img, box)
    assert np.array_equal(found, disc)


def test_object_in_a_loose_box_leaves_out_a_neighbour_crossing_its_rim_and_the_frame():
    """A neighbour over a sixth of the box's rim (it bent a least-squares rim model until nothing
    stood out, and the whole box was taken for the object) is left out, and so is the frame of a
    box cut by the image's edge, where the object touches it."""
    image = np.full((48, 48, 3), (140, 195, 50), dtype=np.uint8)
    image[14:26, 0:12] = (175, 70, 190)  # the object, at the frame
    image[26:38, 15:25] = (13, 212, 183)  # the neighbour, over the box's corner
    box = geometry.box_mask([0, 8, 20, 34], 48, 48)
    rim = box & ~geometry.erode(box, 1)
    assert (rim & (image == (13, 212, 183)).all(-1)).sum() * 6 >= rim[:, 1:].sum()
    obj = np.zeros((48, 48), dtype=bool)
    obj[14:26, 0:12] = True
    assert np.array_equal(geometry.object_in_mask(image, box), obj)


def test_components_label_8_connected_parts():
    mask = np.zeros((9, 12), dtype=bool)
    mask[1:8, 1] = mask[7, 1:6] = mask[1:8, 5] = True  # a U: its arms meet only at the bottom
    mask[0, 7] = mask[1, 8] = True  # diagonal neighbours: one part
    mask[4, 10] = True  # alone
    labels = geometry._components(mask)
    assert np.array_equal(labels > 0, mask)
    parts = [set(labels[mask & (labels == k)].tolist()) for k in np.unique(labels[mask])]
    assert len(parts) == 3
    assert labels[1, 1] == labels[1, 5] and labels[0, 7] == labels[1, 8] != labels[4, 10]


def test_tight_masks_and_masks_where_nothing_stands_out_come_back_unchanged():
    img, disc = _disc_scene(gradient=True)
    assert np.array_equal(geometry.object_in_mask(img, disc), disc)
    empty_box = geometry.box_mask([30, 2, 46, 14], 48, 48)  # background only
    assert np.array_equal(geometry.object_in_mask(img, empty_box), empty_box)
    tiny = geometry.box_mask([20, 24, 22, 26], 48, 48)  # all rim
    assert np.array_equal(geometry.object_in_mask(img, tiny), tiny)


def test_extend_colours_carries_an_object_s_colours_past_its_edge():
    image = np.zeros((12, 12, 3), dtype=np.uint8)
    obj = np.zeros((12, 12), dtype=bool)
    obj[4:8, 4:6], obj[4:8, 6:8] = True, True
    image[4:8, 4:6], image[4:8, 6:8] = (200, 0, 0), (0, 0, 100)
    out = geometry.extend_colours(image, obj, 2)
    assert np.array_equal(out[obj], image[obj])
    assert tuple(out[4, 3]) == (200, 0, 0) and tuple(out[4, 8]) == (0, 0, 100)
    assert tuple(out[3, 5]) == (133, 0, 33)  # above the seam: two red neighbours, one blue
    assert not geometry.dilate(obj, 2)[0].any() and not out[0].any()  # 3 px out: untouched


def test_fill_from_rim_continues_a_gradient_under_a_removed_object():
    """The hole gets the background's gradient back; a neighbour touching the ring is left out of
    the fit; outside the hole nothing changes."""
    ys, xs = np.mgrid[0:64, 0:80].astype(np.float64)
    background = np.stack([40 + 2 * xs, 200 - ys, 90 + xs + ys], axis=-1)
    image = np.clip(background, 0, 255).astype(np.uint8)
    image[20:40, 20:40] = (250, 10, 10)  # the object
    image[20:40, 42:50] = (10, 250, 10)  # a neighbour, inside the ring's reach
    hole = np.zeros((64, 80), dtype=bool)
    hole[19:41, 19:41] = True
    out = geometry.fill_from_rim(image, hole)
    truth = np.clip(background, 0, 255)
    assert np.abs(out[hole].astype(float) - truth[hole]).max() <= 2
    assert np.array_equal(out[~hole], image[~hole])


def _gradient_scene() -> np.ndarray:
    ys, xs = np.mgrid[0:48, 0:64].astype(np.float64)
    return np.stack([40 + 2 * xs, 200 - 2 * ys, 90 + xs], axis=-1).clip(0, 255).astype(np.uint8)


def test_drag_copy_moves_the_part_under_the_handle_and_paints_its_old_place():
    """A square held whole by the region moves by the drag vector; its old place gets the
    gradient back; a neighbour touching it, and everything outside the region, stay."""
    image = _gradient_scene()
    image[10:20, 10:20] = (250, 10, 10)  # the dragged square
    image[20:26, 20:26] = (10, 10, 250)  # a neighbour touching its corner, in the region too
    region = geometry.box_mask([4, 4, 40, 30], 48, 64)
    out, changed = geometry.drag_copy(image, region, (15.0, 15.0), (23.0, 13.0))
    red = (out == (250, 10, 10)).all(-1)
    want = np.zeros_like(red)
    want[8:18, 18:28] = True
    assert np.array_equal(red, want)
    assert np.array_equal(out[20:26, 20:26], image[20:26, 20:26])
    assert (out == (10, 10, 250)).all(-1).sum() == 36  # and it went nowhere else
    left = np.zeros_like(red)
    left[18:20, 10:18] = True  # no longer covered: the background's gradient, not red
    assert np.abs(out[left].astype(int) - _gradient_scene()[left]).max() <= 2
    assert np.array_equal(out[~region], image[~region]) and not changed[~region].any()


def test_drag_copy_stretches_an_object_a_region_edge_cuts():
    """A region from a square's centre line on, its far edge dragged 6 px out: the half in the
    region moves and the cut's column fills the gap (a 10 × 16 rectangle), the other half stays;
    a handle over nothing that stands out, in a flat region, changes nothing visible."""
    image = _gradient_scene()
    image[10:20, 10:20] = (250, 10, 10)
    region = geometry.box_mask([15, 4, 40, 30], 48, 64)  # from the square's centre line on
    out, _ = geometry.drag_copy(image, region, (19.5, 15.0), (25.5, 15.0))
    red = (out == (250, 10, 10)).all(-1)
    want = np.zeros_like(red)
    want[10:20, 10:26] = True
    assert np.array_equal(red, want)
    flat = np.full((20, 20, 3), 90, dtype=np.uint8)
    moved, _ = geometry.drag_copy(flat, geometry.box_mask([2, 2, 18, 18], 20, 20), (8, 8), (12, 8))
    assert np.array_equal(moved, flat)


def test_transfer_colors_gives_the_region_the_reference_colours_and_keeps_its_shading():
    """A shaded object takes the reference's mean and spread per channel, each pixel keeping its
    rank; a flat object takes the reference's mean; nothing outside the region changes."""
    rng = np.random.default_rng(0)
    image = np.full((32, 32, 3), 128, dtype=np.uint8)
    region = np.zeros((32, 32), dtype=bool)
    region[8:24, 8:24] = True
    shade = np.linspace(60, 180, 16)[None, :].repeat(16, 0)
    image[8:24, 8:24] = np.stack([shade, shade / 2, 255 - shade], -1).astype(np.uint8)
    reference = rng.integers(0, 255, (20, 20, 3)).astype(np.uint8)
    ref_region = np.zeros((20, 20), dtype=bool)
    ref_region[2:12, 5:15] = True
    reference[ref_region] = np.clip(rng.normal((30, 200, 90), 12, (100, 3)), 0, 255)
    out = geometry.transfer_colors(image, region, reference, ref_region)
    want = reference[ref_region].astype(float)
    got = out[region].astype(float)
    assert np.abs(got.mean(0) - want.mean(0)).max() < 1.0
    assert np.abs(got.std(0) - want.std(0)).max() < 1.0
    # the shading's order survives: brighter in the source, brighter in the result (channel 0)
    shading = image[region][:, 0].astype(float)
    assert np.all(np.diff(got[:, 0][np.argsort(shading, kind="stable")]) >= 0)
    assert np.array_equal(out[~region], image[~region])
    flat = np.full((32, 32, 3), (200, 30, 30), dtype=np.uint8)
    recoloured = geometry.transfer_colors(flat, region, reference, ref_region)
    assert np.abs(recoloured[region].astype(float) - want.mean(0)).max() <= 1
