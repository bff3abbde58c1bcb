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
) -> Composite:
    """Blend the working-size edit into the source.

    Args:
        source: the source image, h×w×3 uint8 (the frame's source size).
        work_image: the decoded edit at the working size.
        frame: the source ↔ working size map.
        region_work: working-size pixels the edit may change.
        margin_work: working pixels from the region's edge to the untouched source; the weight
            falls from 1 at the edge to 0 across it.
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
    out[y0:y1, x0:x1] = np.clip(np.round(crop + weight * (edit - crop)), 0, 255).astype(np.uint8)
    return Composite(out, float(np.count_nonzero(weight)) / (h * w), 2 * half)


def _box_blur(values: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)² window clipped to the frame (a region that reaches the frame keeps
    its full weight there)."""
    for axis in (0, 1):
        sums, length = window_sums(values, r, axis)
        values = (sums / length).astype(np.float32)
    return values
