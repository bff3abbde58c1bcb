"""Drawing a spec over its images: masks, arrows and the target region, side by side with the
reference. What `dragonctl preview` and `--save-preview` write, and the benchmarks' sheets use."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from dragonctl.geometry import bbox_center, dilate, erode
from dragonctl.inputs import EditInputs, paste_target
from dragonctl.spec import LoadedSpec

OBJECT, REGION, FILL, TARGET = (230, 60, 60), (60, 160, 230), (240, 200, 40), (60, 220, 90)
LEGEND = (
    ("object / reference object", OBJECT),
    ("editable region", REGION),
    ("fill region", FILL),
    ("where it lands", TARGET),
)
MIN_SIDE = 256  # small images are drawn larger (whole multiples), so masks and arrows read


def preview_sheet(ls: LoadedSpec, inp: EditInputs) -> np.ndarray:
    """What `dragonctl preview` writes: `preview_image` at a readable size, with a legend."""
    k = max(1, -(-MIN_SIDE // min(inp.source.shape[:2])))
    return with_legend(preview_image(ls, inp, k))


def preview_image(ls: LoadedSpec, inp: EditInputs, scale: int = 1) -> np.ndarray:
    """The source with the spec drawn over it (and the reference with its mask, beside it);
    every mask has a black-and-white outline, so it shows on any colour. `scale` enlarges."""
    s = ls.spec

    def up(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.repeat(np.repeat(a, scale, 0), scale, 1)

    mask, source = up(inp.mask), up(inp.source)
    img = overlay(source, mask if s.mode != "drag" else None, OBJECT)
    if s.mode == "drag" and mask is not None and not mask.all():
        img = overlay(img, mask, REGION, 0.25)
    if inp.fill_region is not None:
        img = overlay(img, up(inp.fill_region), FILL, 0.3)
    if inp.target_mask is not None:
        img = overlay(img, up(inp.target_mask), TARGET, 0.45)
    if s.mode in ("move", "resize") and inp.mask is not None:
        cx, cy = bbox_center(inp.mask)
        dx, dy = s.offset or (0.0, 0.0)
        img = draw_arrows(img, [((cx * scale, cy * scale), ((cx + dx) * scale, (cy + dy) * scale))])
    if s.mode == "drag":
        img = draw_arrows(
            img,
            [
                ((hx * scale, hy * scale), (tx * scale, ty * scale))
                for (hx, hy), (tx, ty) in inp.points
            ],
        )
    panels = [img]
    if inp.reference is not None and inp.reference_mask is not None:
        panels.append(overlay(up(inp.reference), up(inp.reference_mask), OBJECT))
        if s.mode == "paste" and s.at is not None:
            placed = paste_target(
                inp.reference_mask, s.effective_scale, (s.at[0], s.at[1]), inp.source.shape[:2]
            )
            panels[0] = overlay(panels[0], up(placed), TARGET)
    return side_by_side(*panels)


def with_legend(image: np.ndarray) -> np.ndarray:
    """The image above a strip naming each overlay colour."""
    from PIL import ImageFont

    font = ImageFont.load_default()
    row = 14
    strip = Image.new("RGB", (max(image.shape[1], 200), row * len(LEGEND) + 6), (255, 255, 255))
    d = ImageDraw.Draw(strip)
    for k, (name, colour) in enumerate(LEGEND):
        y = 3 + k * row
        d.rectangle([4, y + 2, 14, y + 11], fill=colour, outline=(0, 0, 0))
        d.text((20, y), name, fill=(0, 0, 0), font=font)
    return side_by_side_vertical(image, np.asarray(strip))


def side_by_side_vertical(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    w = max(top.shape[1], bottom.shape[1])
    pad = lambda a: np.pad(a, ((0, 0), (0, w - a.shape[1]), (0, 0)), constant_values=255)  # noqa: E731
    return np.concatenate([pad(top), pad(bottom)], axis=0)


def overlay(
    image: np.ndarray, mask: np.ndarray | None, color: tuple[int, int, int], alpha: float = 0.45
) -> np.ndarray:
    out = image.astype(np.float32).copy()
    if mask is not None:
        out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, dtype=np.float32)
        edge = mask & ~erode(mask, 1)
        out[edge] = 255.0  # a white line inside, a black one outside: visible on any colour
        out[dilate(mask, 1) & ~mask] = 0.0
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
