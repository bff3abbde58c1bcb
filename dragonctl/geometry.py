"""Masks and coordinates: inline shapes, dilation, and the source ↔ working size ↔ grid maps.

Coordinates are pixel coordinates (x right, y down) where pixel (i, j) covers [i, i+1) × [j, j+1);
a point's position scales about pixel edges, so `to_work` and `to_source` are exact inverses.

Grids for a working size H×W and latent factor f: latent (H/f)×(W/f); features twice that, i.e.
cells of f/2 pixels (H/4 × W/4 for SD). Geometry is computed in working pixels, then per grid.
Everything here is numpy: `dragonctl validate` uses it without loading torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


def working_size(
    height: int, width: int, resolution: int, multiple: int, max_resolution: int | None = None
) -> tuple[int, int]:
    """Area-preserving resize to ≈ resolution², both sides multiples of `multiple` (≥ one).

    Args:
        max_resolution: a source larger than resolution² is edited at its own area up to
            max_resolution² (None, or not above resolution: always resolution²).
    """
    own = math.sqrt(height * width)
    side = max(resolution, min(own, max_resolution or resolution))
    k = side / own
    h = max(multiple, round(height * k / multiple) * multiple)
    w = max(multiple, round(width * k / multiple) * multiple)
    return h, w


@dataclass(frozen=True)
class Frame:
    """The map between a source image (h×w) and the model's working size (H×W)."""

    src_h: int
    src_w: int
    work_h: int
    work_w: int

    @property
    def sx(self) -> float:
        return self.work_w / self.src_w

    @property
    def sy(self) -> float:
        return self.work_h / self.src_h

    def to_work(self, x: float, y: float) -> tuple[float, float]:
        return x * self.sx, y * self.sy

    def to_source(self, x: float, y: float) -> tuple[float, float]:
        return x / self.sx, y / self.sy

    def image_to_work(self, img: np.ndarray) -> np.ndarray:
        if img.shape[:2] == (self.work_h, self.work_w):
            return img
        return np.asarray(
            Image.fromarray(img).resize((self.work_w, self.work_h), Image.Resampling.LANCZOS)
        )

    def image_to_source(self, img: np.ndarray) -> np.ndarray:
        if img.shape[:2] == (self.src_h, self.src_w):
            return img
        return np.asarray(
            Image.fromarray(img).resize((self.src_w, self.src_h), Image.Resampling.LANCZOS)
        )

    def mask_to_work(self, mask: np.ndarray) -> np.ndarray:
        return resize_mask(mask, self.work_h, self.work_w)


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a boolean mask by area coverage (a cell is in when at least half of it is covered)."""
    if mask.shape == (height, width):
        return mask.copy()
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    resample = Image.Resampling.BOX if height <= mask.shape[0] else Image.Resampling.BILINEAR
    return np.asarray(img.resize((width, height), resample)) >= 128


def grid_mask(mask: np.ndarray, height: int, width: int, touch: bool = False) -> np.ndarray:
    """A working-size mask on a coarser grid: by half coverage, or any coverage when `touch`."""
    h, w = mask.shape
    if h % height == 0 and w % width == 0:
        cells = mask.reshape(height, h // height, width, w // width).mean(axis=(1, 3))
        return cells > 0 if touch else cells >= 0.5
    cov = np.asarray(
        Image.fromarray(mask.astype(np.float32)).resize((width, height), Image.Resampling.BOX)
    )
    return cov > 1e-6 if touch else cov >= 0.5


def box_mask(box: list[float], height: int, width: int) -> np.ndarray:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    m = np.zeros((height, width), dtype=bool)
    m[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    return m


def polygon_mask(points: list[list[float]], height: int, width: int) -> np.ndarray:
    img = Image.new("L", (width, height), 0)
    ImageDraw.Draw(img).polygon([(float(x), float(y)) for x, y in points], fill=255)
    return np.asarray(img) > 0


def circle_mask(circle: list[float], height: int, width: int) -> np.ndarray:
    cx, cy, r = circle
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Square dilation by `pixels` (a (2p+1)² window), separable and by running sums: the same
    cost at any radius."""
    if pixels <= 0:
        return mask
    return _dilate_axis(_dilate_axis(mask, pixels, 0), pixels, 1)


def _dilate_axis(mask: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Each pixel is set when any pixel within r of it along `axis` is (the frame clips)."""
    return window_sums(mask, r, axis)[0] > 0


def window_sums(values: np.ndarray, r: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums over the window of ±r along `axis`, clipped by the frame, by running sums (the same
    cost at any r); and each window's length, shaped to broadcast along `axis`."""
    v = np.moveaxis(values, axis, 0)
    n = v.shape[0]
    kind = np.float64 if values.dtype.kind == "f" else np.int32
    sums = np.zeros((n + 1, *v.shape[1:]), dtype=kind)
    np.cumsum(v, axis=0, out=sums[1:])
    idx = np.arange(n)
    hi, lo = np.minimum(idx + r + 1, n), np.maximum(idx - r, 0)
    length = np.moveaxis((hi - lo).reshape(-1, *[1] * (v.ndim - 1)), 0, axis)
    return np.moveaxis(sums[hi] - sums[lo], 0, axis), length


def erode(mask: np.ndarray, pixels: int) -> np.ndarray:
    return ~dilate(~mask, pixels)


# A pixel belongs to the object inside a loose mask when its colour is this far (RGB in [0, 1]) from
# what the mask's rim predicts there, or further when the rim itself varies more (texture).
OBJECT_CONTRAST = 0.1


def _affine_basis(where: np.ndarray) -> np.ndarray:
    """[1, x/W, y/H] per pixel of `where`: an affine colour model's basis (a gradient background is
    affine in x and y, a flat one constant)."""
    ys, xs = np.nonzero(where)
    h, w = where.shape
    return np.stack([np.ones_like(xs, dtype=np.float64), xs / w, ys / h], axis=1)


def _colour_residual(img: np.ndarray, where: np.ndarray, coef: np.ndarray) -> np.ndarray:
    return np.linalg.norm(img[where] - _affine_basis(where) @ coef, axis=1)


def object_in_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The object inside a loose mask (a box drawn with a margin around it): the mask's pixels whose
    colour stands out from the background its rim shows.

    Statistics pooled over a loose mask mix the margin's background into the object's; this is what
    they pool instead. The rim's colour model leaves out rim pixels far off a first fit (a
    neighbouring object reaching into the box), and so do the found pixels: of several separate
    parts, those touching the rim are a neighbour's when the others are most of them. A tight mask
    (its inner rim unlike the pixels just outside it, i.e. the rim is on the object) and a mask in
    which nothing stands out come back unchanged.
    """
    img = image.astype(np.float64) / 255.0
    inner = np.zeros_like(mask)
    inner[1:-1, 1:-1] = True  # a box cut by the frame goes on outside it: the frame is no rim
    rim = mask & ~erode(mask, 1) & inner
    outside = dilate(mask, 1) & ~mask
    if rim.sum() < 8 or (mask & ~rim).sum() == 0:
        return mask
    coef, on_background = _robust_colour_model(img, rim)
    residual = _colour_residual(img, rim, coef)[on_background]
    tol = max(OBJECT_CONTRAST, 2.0 * float(np.quantile(residual, 0.9)))
    if outside.any() and float(np.median(_colour_residual(img, outside, coef))) > tol:
        return mask  # the rim lies on the object: the mask is tight
    found = np.zeros_like(mask)
    found[mask] = _colour_residual(img, mask, coef) > tol
    found = _without_parts_on(found, rim)
    return found if found.sum() >= 4 else mask


def _robust_colour_model(img: np.ndarray, where: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The affine colour model (3×3) of `where`'s pixels, fitted to those near their median colour
    and refitted to those near the fit (a least-squares first fit bends towards a neighbour that
    covers a sixth of a rim); and which of them it kept."""
    basis, colours = _affine_basis(where), img[where]
    residual = np.linalg.norm(colours - np.median(colours, axis=0), axis=1)
    for _ in range(2):
        keep = residual <= max(3.0 * float(np.median(residual)), OBJECT_CONTRAST / 2)
        coef, *_ = np.linalg.lstsq(basis[keep], colours[keep], rcond=None)
        residual = np.linalg.norm(colours - basis @ coef, axis=1)
    keep = residual <= max(3.0 * float(np.median(residual)), OBJECT_CONTRAST / 2)
    return coef, keep


def _without_parts_on(found: np.ndarray, rim: np.ndarray) -> np.ndarray:
    """`found` less its 8-connected parts that touch `rim`, when those that do not are most of it
    (not a few stray pixels)."""
    if not found.any():
        return found
    ys, xs = np.nonzero(found)
    box = np.s_[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    labels = _components(found[box])
    on_rim = np.unique(labels[rim[box] & found[box]])
    inner = np.zeros_like(found)
    inner[box] = (labels > 0) & ~np.isin(labels, on_rim)
    return inner if inner.sum() * 2 >= found.sum() else found


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels (each part's smallest flat pixel index + 1; 0 off the mask):
    each round takes the smallest label among a pixel's neighbours, then follows labels to their
    own labels (pointer jumping), so a part of diameter d settles in about log d rounds of numpy
    work over the image, never a Python loop over its pixels."""
    h, w = mask.shape
    off = h * w
    labels = np.where(mask, np.arange(off).reshape(h, w), off)
    while True:
        padded = np.pad(labels, 1, constant_values=off)
        smallest = labels
        for dy in range(3):
            for dx in range(3):
                smallest = np.minimum(smallest, padded[dy : dy + h, dx : dx + w])
        flat = np.where(mask, smallest, off).ravel()
        on = flat < off
        for _ in range(2):
            flat[on] = flat[flat[on]]
        if np.array_equal(flat, labels.ravel()):
            return np.where(mask, labels + 1, 0)
        labels = flat.reshape(h, w)


def fill_from_rim(
    image: np.ndarray, hole: np.ndarray, ignore: np.ndarray | None = None
) -> np.ndarray:
    """The image with `hole` painted by the affine colour model of a ring around it: a flat or
    gradient background continues where an object was. Ring pixels far off the first fit (a
    neighbouring object's) are left out of the second, and those in `ignore` from the start."""
    ring = dilate(hole, 2) & ~hole & (True if ignore is None else ~ignore)
    if ring.sum() < 8 or not hole.any():
        return image.copy()
    img = image.astype(np.float64)
    keep = np.ones(int(ring.sum()), dtype=bool)
    for _ in range(2):
        basis = _affine_basis(ring)
        coef, *_ = np.linalg.lstsq(basis[keep], img[ring][keep], rcond=None)
        residual = np.linalg.norm(img[ring] - basis @ coef, axis=1)
        keep = residual <= max(3.0 * float(np.median(residual)), 8.0)
    out = img.copy()
    out[hole] = _affine_basis(hole) @ coef
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def transfer_colors(
    image: np.ndarray, region: np.ndarray, reference: np.ndarray, ref_region: np.ndarray
) -> np.ndarray:
    """The image with `region`'s pixels taking, channel by channel, the mean and spread of the
    reference's `ref_region` (Reinhard's colour transfer, in RGB): each pixel keeps its place in
    the region's own variation, so the object's shape and shading stay and its colours change."""
    img, ref = image.astype(np.float64), reference.astype(np.float64)
    a, b = img[region], ref[ref_region]
    # a flat region has no spread to scale: it takes the reference's mean (and no noise blown up)
    gain = b.std(0) / np.maximum(a.std(0), 2.0)
    out = img.copy()
    out[region] = (a - a.mean(0)) * gain + b.mean(0)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def bbox_center(mask: np.ndarray) -> tuple[float, float]:
    """Centre of the mask's bounding box: the anchor of resize and paste."""
    ys, xs = np.nonzero(mask)
    return (xs.min() + xs.max() + 1) / 2.0, (ys.min() + ys.max() + 1) / 2.0


def warp_mask(
    mask: np.ndarray,
    scale: float,
    center: tuple[float, float],
    dest: tuple[float, float],
    out_shape: tuple[int, int],
) -> np.ndarray:
    """Scale `mask` by `scale` about `center` and place that centre at `dest` (nearest sampling).

    A destination pixel p is in when the source pixel at center + (p − dest)/scale is. The map is
    separable (columns from x, rows from y), so it costs a byte per output pixel.
    """
    h, w = out_shape
    ix = np.floor(center[0] + (np.arange(w) + 0.5 - dest[0]) / scale)
    iy = np.floor(center[1] + (np.arange(h) + 0.5 - dest[1]) / scale)
    okx, oky = (ix >= 0) & (ix < mask.shape[1]), (iy >= 0) & (iy < mask.shape[0])
    cols = np.where(okx, ix, 0).astype(np.int64)
    rows = np.where(oky, iy, 0).astype(np.int64)
    out = mask[np.ix_(rows, cols)].copy()
    out[~oky, :] = False
    out[:, ~okx] = False
    return out


def warp_index(
    out_shape: tuple[int, int],
    src_shape: tuple[int, int],
    scale: float,
    center: tuple[float, float],
    dest: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """For each cell of an output grid, the (row, col) of the source cell it comes from under the
    same map as `warp_mask`, in the grids' own units (-1 where it falls outside)."""
    h, w = out_shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    sx = center[0] + (xs - dest[0]) / scale
    sy = center[1] + (ys - dest[1]) / scale
    ix, iy = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    ok = (ix >= 0) & (ix < src_shape[1]) & (iy >= 0) & (iy < src_shape[0])
    return np.where(ok, iy, -1), np.where(ok, ix, -1)


# ---------------------------------------------------------------------------------------------
# the model's grids

FEATURE_UPSCALE = 2  # the common feature grid is twice the latent grid, as in the reference


@dataclass(frozen=True)
class Grids:
    """The latent and feature grids of one working size."""

    work_hw: tuple[int, int]
    latent_factor: int

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.work_hw[0] // self.latent_factor, self.work_hw[1] // self.latent_factor

    @property
    def feature_hw(self) -> tuple[int, int]:
        h, w = self.latent_hw
        return h * FEATURE_UPSCALE, w * FEATURE_UPSCALE

    @property
    def feature_cell(self) -> float:
        """Working pixels per feature cell."""
        return self.latent_factor / FEATURE_UPSCALE

    def latent(self, mask: np.ndarray, touch: bool = True) -> np.ndarray:
        """Latent cells the working-size mask touches (or half covers, with touch=False)."""
        return grid_mask(mask, *self.latent_hw, touch=touch)

    def latent_core(self, mask: np.ndarray) -> np.ndarray:
        """Latent cells at least half inside the mask (the cells it touches when there are none)."""
        return _half_covered(mask, self.latent_hw)

    def feature(self, mask: np.ndarray) -> np.ndarray:
        """Feature cells at least half inside the mask (else the cells it touches)."""
        return _half_covered(mask, self.feature_hw)

    def blend_margin(self) -> int:
        """Working pixels of surroundings a copied region takes along (half a latent cell), so
        its edges blend in the latent rather than cut through a cell."""
        return max(1, self.latent_factor // 2)


def grid_ratio(feature_hw: tuple[int, int], latent_factor: int, resolution: int) -> float:
    """Feature cells of this grid over those of a square `resolution`² image's: how much thinner
    an energy averaged over the grid's cells spreads its gradient here."""
    side = resolution * FEATURE_UPSCALE / latent_factor
    return feature_hw[0] * feature_hw[1] / side**2


def _half_covered(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    m = grid_mask(mask, *hw)
    if not m.any() and mask.any():  # smaller than half a cell: keep the cells it touches
        m = grid_mask(mask, *hw, touch=True)
    return m


def patch_indices(x: float, y: float, cell: float, hw: tuple[int, int]) -> np.ndarray:
    """Flat indices of the 3×3 cells centred on the cell holding (x, y), clipped inside the grid."""
    h, w = hw
    cy = min(max(int(y // cell), 1), h - 2)
    cx = min(max(int(x // cell), 1), w - 2)  # clipped by the width (the reference used the height)
    return np.array([(cy + dy) * w + (cx + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])


def extend_colours(image: np.ndarray, mask: np.ndarray, pixels: int) -> np.ndarray:
    """The image with the mask's colours carried `pixels` past its edge, ring by ring (each new
    pixel the mean of its 3×3 neighbours already filled): resampling the object then blends its
    edge with its own colours, not with its surroundings."""
    out = image.astype(np.float64)
    known = mask.copy()
    for _ in range(pixels):
        weighted = np.where(known[..., None], out, 0.0)
        sums = window_sums(window_sums(weighted, 1, 0)[0], 1, 1)[0]
        counts = window_sums(window_sums(known.astype(np.int32), 1, 0)[0], 1, 1)[0]
        ring = (counts > 0) & ~known
        out[ring] = sums[ring] / counts[ring][:, None]
        known = known | ring
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def place_reference(
    ref: np.ndarray,
    ref_mask: np.ndarray,
    scale: float,
    at: tuple[float, float],
    out_hw: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Warp the reference so its object's box centre lands at `at`, scaled by `scale` (aspect kept).

    Returns the placed image (the reference's mean colour outside it) and the placed object mask,
    both in the destination's pixels. Pixel p samples the reference at c + (p - at)/scale.
    """
    c = bbox_center(ref_mask)
    h, w = out_hw
    a = 1.0 / scale
    # PIL maps output (x, y) → input (a·x + c0, a·y + c1) in pixel-edge coordinates.
    data = (a, 0.0, c[0] - at[0] * a, 0.0, a, c[1] - at[1] * a)
    fill = tuple(int(v) for v in ref.reshape(-1, 3).mean(axis=0))
    img = Image.fromarray(ref).transform(
        (w, h), Image.Transform.AFFINE, data, Image.Resampling.BICUBIC, fillcolor=fill
    )
    mask = warp_mask(ref_mask, scale, c, at, out_hw)
    return np.asarray(img), mask


def interior(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The mask less a border of `pixels` (the whole mask when nothing would be left)."""
    inner = erode(mask, pixels)
    return inner if inner.any() else mask


def part_under(
    image: np.ndarray,
    region: np.ndarray,
    point: tuple[float, float],
    standing_out: np.ndarray | None = None,
) -> np.ndarray:
    """The connected part of the object under `point` that lies in `region`: of the pixels that
    stand out from the region's rim (`object_in_mask`) in about the point's colour, or, when
    nothing stands out, of those within `OBJECT_CONTRAST` of it, the 8-connected piece nearest
    the point (≤ 2 px off, as a handle on an object's edge can be). Empty when there is none.
    `standing_out`: `object_in_mask(image, region)` when the caller has it already."""
    h, w = region.shape
    px, py = min(max(int(point[0]), 0), w - 1), min(max(int(point[1]), 0), h - 1)
    near = image[max(py - 1, 0) : py + 2, max(px - 1, 0) : px + 2].reshape(-1, 3)
    colour = np.median(near.astype(np.float64), axis=0) / 255.0
    distance = np.linalg.norm(image.astype(np.float64) / 255.0 - colour, axis=-1)
    found = object_in_mask(image, region) if standing_out is None else standing_out.copy()
    if np.array_equal(found, region):
        found = region & (distance < OBJECT_CONTRAST)
    else:  # a neighbour touching the object stands out from the rim too, in its own colour
        found &= distance < 2 * OBJECT_CONTRAST
    around = np.zeros_like(found)
    around[max(py - 2, 0) : py + 3, max(px - 2, 0) : px + 3] = True
    if not (found & around).any():
        return np.zeros_like(found)
    labels = _components(found)
    ys, xs = np.nonzero(found & around)
    nearest = np.argmin((xs - px) ** 2 + (ys - py) ** 2)
    return labels == labels[ys[nearest], xs[nearest]]


def drag_copy(
    image: np.ndarray,
    region: np.ndarray,
    handle: tuple[float, float],
    target: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """The image with the part of the object under `handle` (`part_under`, in `region`) dragged
    by target − handle, and the pixels the drag took part from or put part on.

    Each pixel of the region takes the pixel a share of the drag vector behind it: the whole
    vector where the way back stays in the region, else as far back as it does. So the part
    moves rigidly where the region holds it, and where the region's edge cuts through the
    object, the object's section at the cut stretches into the gap (a square dragged by its far
    edge, beyond a cut at its centre, becomes a longer rectangle). Only the part's pixels land;
    the place it leaves is painted from its surroundings (`fill_from_rim`)."""
    standing_out = object_in_mask(image, region)
    part = part_under(image, region, handle, standing_out)
    if not part.any():
        return image.copy(), np.zeros_like(region)
    vx, vy = target[0] - handle[0], target[1] - handle[1]
    h, w = region.shape
    # only the region's pixels change: work in its box (a short drag on a large photo)
    rows, cols = np.nonzero(region.any(axis=1))[0], np.nonzero(region.any(axis=0))[0]
    box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    ys, xs = np.mgrid[box].astype(np.float64) + 0.5  # pixel centres
    n = max(1, math.ceil(2 * math.hypot(vx, vy)))  # half-pixel steps back along the vector
    share = np.zeros(ys.shape)
    inside = region[box].copy()
    for k in range(1, n + 1):
        bx, by = np.floor(xs - k / n * vx).astype(int), np.floor(ys - k / n * vy).astype(int)
        valid = (bx >= 0) & (bx < w) & (by >= 0) & (by < h)
        inside &= valid & region[by.clip(0, h - 1), bx.clip(0, w - 1)]
        share = np.where(inside, k / n, share)
    sx, sy = xs - share * vx, ys - share * vy
    landed = np.zeros_like(region)
    landed[box] = (
        region[box]
        & part[np.floor(sy).astype(int).clip(0, h - 1), np.floor(sx).astype(int).clip(0, w - 1)]
    )
    # the part's edge resamples with its own colours, not the background it leaves
    moved = _bilinear(extend_colours(image, part, 2), sx, sy)  # the box's pixels
    # the object beyond the region's edge (where a cut crosses it) is no background to paint with
    colour = np.median(image[part].astype(np.float64), axis=0)
    like_part = np.linalg.norm(image.astype(np.float64) - colour, axis=-1) < 255 * OBJECT_CONTRAST
    # the part's edge goes with it, a neighbour's pixels next to it stay
    others = standing_out & ~like_part
    hole = dilate(part, 1) & region & ~others
    out = fill_from_rim(image, hole, ignore=like_part)
    out[landed] = moved[landed[box]]
    return out, hole | landed


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The image sampled at continuous pixel coordinates (centres at i + 0.5), edges clamped."""
    h, w = image.shape[:2]
    u, v = x - 0.5, y - 0.5
    x0, y0 = np.floor(u).astype(int), np.floor(v).astype(int)
    fx, fy = (u - x0)[..., None], (v - y0)[..., None]
    img = image.astype(np.float64)

    def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        return img[yy.clip(0, h - 1), xx.clip(0, w - 1)]

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return np.clip(np.round(top * (1 - fy) + bottom * fy), 0, 255).astype(np.uint8)
