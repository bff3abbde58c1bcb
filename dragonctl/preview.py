"""Drawing a spec over its images: masks, arrows and the target region, side by side with the
reference. What `dragonctl preview` and `--save-preview` write, and the benchmarks' sheets use."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from dragonctl.geometry import bbox_center
from dragonctl.inputs import EditInputs, paste_target
from dragonctl.spec import LoadedSpec

OBJECT, REGION, FILL, TARGET = (230, 60, 60), (60, 160, 230), (240, 200, 40), (60, 220, 90)


def preview_image(ls: LoadedSpec, inp: EditInputs) -> np.ndarray:
    """The source with the spec drawn over it (and the reference with its mask, beside it)."""
    s = ls.spec
    img = overlay(inp.source, inp.mask if s.mode != "drag" else None, OBJECT)
    if s.mode == "drag" and inp.mask is not None and not inp.mask.all():
        img = overlay(img, inp.mask, REGION, 0.25)
    if inp.fill_region is not None:
        img = overlay(img, inp.fill_region, FILL, 0.3)
    if inp.target_mask is not None:
        img = overlay(img, inp.target_mask, TARGET, 0.45)
    if s.mode in ("move", "resize") and inp.mask is not None:
        cx, cy = bbox_center(inp.mask)
        dx, dy = s.offset or (0.0, 0.0)
        img = draw_arrows(img, [((cx, cy), (cx + dx, cy + dy))])
    if s.mode == "drag":
        img = draw_arrows(img, inp.points)
    panels = [img]
    if inp.reference is not None and inp.reference_mask is not None:
        panels.append(overlay(inp.reference, inp.reference_mask, OBJECT))
        if s.mode == "paste" and s.at is not None:
            placed = paste_target(
                inp.reference_mask, s.effective_scale, (s.at[0], s.at[1]), inp.source.shape[:2]
            )
            panels[0] = overlay(panels[0], placed, TARGET)
    return side_by_side(*panels)


def overlay(
    image: np.ndarray, mask: np.ndarray | None, color: tuple[int, int, int], alpha: float = 0.45
) -> np.ndarray:
    out = image.astype(np.float32).copy()
    if mask is not None:
        out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, dtype=np.float32)
    return out.round().astype(np.uint8)


def draw_arrows(
    image: np.ndarray, pairs: list[tuple[tuple[float, float], tuple[float, float]]]
) -> np.ndarray:
    img = Image.fromarray(image)
    d = ImageDraw.Draw(img)
    r = max(2, min(image.shape[:2]) // 64)
    for (hx, hy), (tx, ty) in pairs:
        d.line([(hx, hy), (tx, ty)], fill=(255, 255, 255), width=max(1, r // 2))
        d.ellipse([hx - r, hy - r, hx + r, hy + r], fill=(230, 40, 40))
        d.ellipse([tx - r, ty - r, tx + r, ty + r], fill=(40, 90, 230))
    return np.asarray(img)


def side_by_side(*images: np.ndarray) -> np.ndarray:
    """Panels left to right, top-aligned, with 4 px of white between them."""
    h = max(i.shape[0] for i in images)
    gap = np.full((h, 4, 3), 255, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for k, img in enumerate(images):
        if k:
            parts.append(gap)
        parts.append(np.pad(img, ((0, h - img.shape[0]), (0, 0), (0, 0)), constant_values=255))
    return np.concatenate(parts, axis=1)
