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
