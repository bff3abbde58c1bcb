"""The edit put back into the source: the photo keeps its own pixels wherever the edit did not go.

The model works at its working size (≈ 512² for SD); resizing the whole result back to the
source's size would resample every pixel of a large photo. Instead, the pixels the mode may change
(the plan's latent cells, upsampled) are dilated by a margin and feathered across it; inside, the
edit upscaled; outside, the source itself, bit for bit. Only the region's bounding box is
resampled, so an 8000² photo with a small edit costs a small crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dragonctl.geometry import Frame, dilate, window_sums


@dataclass(frozen=True)
class Composite:
    """A composited result and how much of it came from the edit."""

    image: np.ndarray  # source size, uint8 RGB
    edited_fraction: float  # share of the source's pixels with any weight from the edit
    margin_px: int  # source pixels from the region's edge to where the source is untouched


def region_pixels(latent_region: np.ndarray, latent_factor: int) -> np.ndarray:
    """A latent-grid mask as the working-size pixels its cells cover."""
    return np.kron(latent_region.astype(np.uint8), np.ones((latent_factor,) * 2, np.uint8)) > 0


def composite(
    source: np.ndarray,
    work_image: np.ndarray,
    frame: Frame,
    region_work: np.ndarray,
    margin_work: float,
    color_match: bool = False,
) -> Composite:
    """Blend the working-size edit into the source.

    Args:
        source: the source image, h×w×3 uint8 (the frame's source size).
        work_image: the decoded edit at the working size.
        frame: the source ↔ working size map.
        region_work: working-size pixels the edit may change.
        margin_work: working pixels from the region's edge to the untouched source; the weight
            falls from 1 at the edge to 0 across it.
        color_match: shift the edit's colours by what it got wrong just outside the region
            (`match_colors`), so a generation whose colours drifted shows no box.
    """
    h, w = source.shape[:2]
    ys, xs = np.nonzero(region_work)
    if len(ys) == 0:
        return Composite(source.copy(), 0.0, 0)
    half = max(1, math.ceil(margin_work / min(frame.sx, frame.sy) / 2))
    pad = 2 * half + 2  # the dilation, the feather, and a pixel of rounding each side
    x0 = max(0, math.floor(xs.min() / frame.sx) - pad)
    y0 = max(0, math.floor(ys.min() / frame.sy) - pad)
    x1 = min(w, math.ceil((xs.max() + 1) / frame.sx) + pad)
    y1 = min(h, math.ceil((ys.max() + 1) / frame.sy) + pad)
    box = (x0 * frame.sx, y0 * frame.sy, x1 * frame.sx, y1 * frame.sy)  # the crop, working coords
    size = (x1 - x0, y1 - y0)
    region = (
        np.asarray(
            Image.fromarray(region_work.astype(np.uint8) * 255).resize(
                size, Image.Resampling.BILINEAR, box=box
            )
        )
        >= 128
    )
    # Box-blurring the region dilated by `half` keeps weight 1 on the region and reaches 0 at
    # 2·half from it: outside that, the output is the source's own pixels.
    weight = _box_blur(dilate(region, half).astype(np.float32), half)[..., None]
    edit = np.asarray(
        Image.fromarray(work_image).resize(size, Image.Resampling.LANCZOS, box=box),
        dtype=np.float32,
    )
    out = source.copy()
    crop = out[y0:y1, x0:x1].astype(np.float32)
    if color_match:
        edit = match_colors(edit, crop, region, 2 * half)
    out[y0:y1, x0:x1] = np.clip(np.round(crop + weight * (edit - crop)), 0, 255).astype(np.uint8)
    return Composite(out, float(np.count_nonzero(weight)) / (h * w), 2 * half)


def match_colors(edit: np.ndarray, source: np.ndarray, region: np.ndarray, ring: int) -> np.ndarray:
    """The edit plus a smooth colour correction: its difference from the source on a ring of
    `ring` pixels around the region (pixels the edit did not change, so any difference there is
    the generation's drift: a VAE's colour error, a shifted shade), spread over the crop by
    normalised convolution. What the edit drew inside keeps its own contrasts.

    Args:
        edit, source: h×w×3 float arrays, the same crop.
        region: h×w bool, the pixels the edit may change.
        ring: the ring's width in pixels.
    """
    around = dilate(region, ring) & ~region
    if not around.any():
        return edit
    weight = around.astype(np.float32)[..., None]
    difference = (source - edit) * weight
    radius = max(ring, max(region.shape) // 4)  # smooth: drift, not detail
    for _ in range(3):  # three box blurs ≈ a Gaussian
        difference, weight = _box_blur(difference, radius), _box_blur(weight, radius)
    fallback = (source - edit)[around].mean(0)  # where the ring's reach ends
    known = weight > 1e-3
    correction = np.where(known, difference / np.where(known, weight, 1.0), fallback)
    return edit + correction


def _box_blur(values: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)² window clipped to the frame (a region that reaches the frame keeps
    its full weight there)."""
    for axis in (0, 1):
        sums, length = window_sums(values, r, axis)
        values = (sums / length).astype(np.float32)
    return values
