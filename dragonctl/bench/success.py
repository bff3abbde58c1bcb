"""Case-by-case verdicts for the quality benchmark: did the edit do what a person asked?

A median hides failures; a verdict per case counts them. A case succeeds when every criterion of
its mode holds (each is a name in `CRITERIA`, so a failure says which ones it missed):

- found: the object, found by colour (RGB distance under `COLOUR_DISTANCE` of 255), exists;
- place: its centroid is within `CENTROID_FRACTION` of the image's width of the truth's
  (drag: the handle sits at the object's centre, so the object must move by the drag vector);
- area: its area is within ±`AREA_TOLERANCE` of the truth's (move, resize, drag, paste);
- copies: no second copy: at most `MAX_RESIDUE` of the vacated place keeps the object's colour,
  and object-coloured pixels away from the truth's object are at most `MAX_RESIDUE` of its area;
- background: PSNR away from the edit at least `MIN_BACKGROUND_DB`;
- shape (appearance): the recoloured object's IoU with the original at least `MIN_SHAPE_IOU`
  (the reference's colour *and* the object's own shape);
- overlap (paste): IoU with the truth's placed object at least `MIN_PASTE_IOU`.

`cleanliness` is a figure, not a criterion: the result's high-frequency energy outside the edited
objects over the source's (speckle, halos and grids raise it; 1 is the source's own).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COLOUR_DISTANCE = 60  # of 255: a pixel with the object's colour
CENTROID_FRACTION = 0.03
AREA_TOLERANCE = 0.25
MAX_RESIDUE = 0.2
MIN_BACKGROUND_DB = 28.0
MIN_SHAPE_IOU = 0.8
MIN_PASTE_IOU = 0.7
CRITERIA = ("found", "place", "area", "copies", "background", "shape", "overlap")
HF_FLOOR = 1.0  # squared levels: high-frequency energy below one level counts as none


def verdict(mode: str, m: dict[str, float], width: int) -> list[str]:
    """The criteria a case failed (empty: a success), from its `quality.score` metrics."""
    failed = []
    if m["found_area"] == 0:
        failed.append("found")
    if m["centroid_error"] > CENTROID_FRACTION * width:
        failed.append("place")
    if mode != "appearance" and m["area_error"] > AREA_TOLERANCE:
        failed.append("area")
    if m["residue"] > MAX_RESIDUE or m["stray"] > MAX_RESIDUE:
        failed.append("copies")
    if m["background_psnr"] < MIN_BACKGROUND_DB:
        failed.append("background")
    if mode == "appearance" and m["shape_iou"] < MIN_SHAPE_IOU:
        failed.append("shape")
    if mode == "paste" and m["iou"] < MIN_PASTE_IOU:
        failed.append("overlap")
    return failed


def high_frequency(img: np.ndarray, where: np.ndarray) -> float:
    """Mean squared difference from the 3×3 box blur (levels², channels averaged) over `where`."""
    x = img.astype(np.float64)
    pad = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    blur = sum(pad[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9
    return float(((x - blur) ** 2).mean(axis=-1)[where].mean()) if where.any() else 0.0


def cleanliness(result: np.ndarray, source: np.ndarray, where: np.ndarray) -> float:
    """The result's high-frequency energy over the source's, in `where` (floored at one level²)."""
    return (high_frequency(result, where) + HF_FLOOR) / (high_frequency(source, where) + HF_FLOOR)


def failure_sheet(rows: list[tuple[np.ndarray, str]], scale: int = 3) -> np.ndarray | None:
    """One contact sheet: each failed case's panels, enlarged, with its name and failed criteria
    written beside them. None when there is nothing to show."""
    if not rows:
        return None
    text_w = 260
    strips = []
    for panels, label in rows:
        big = Image.fromarray(panels).resize(
            (panels.shape[1] * scale, panels.shape[0] * scale), Image.Resampling.NEAREST
        )
        strip = Image.new("RGB", (big.width + text_w, big.height + 8), (255, 255, 255))
        strip.paste(big, (0, 0))
        draw = ImageDraw.Draw(strip)
        for k, line in enumerate(label.split("\n")):
            draw.text((big.width + 8, 6 + 14 * k), line, fill=(0, 0, 0))
        strips.append(np.asarray(strip))
    w = max(s.shape[1] for s in strips)
    return np.concatenate(
        [np.pad(s, ((0, 0), (0, w - s.shape[1]), (0, 0)), constant_values=255) for s in strips]
    )
