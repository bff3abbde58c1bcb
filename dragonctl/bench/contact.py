"""Before/after contact sheets from `bench quality` runs: the first cases of each mode as they
were asked (the source with the edit drawn over it) and as they came out, framed by verdict."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dragonctl.errors import SpecError, UsageError

SUCCESS, FAILURE = (40, 170, 70), (220, 40, 40)
LABEL_W, CAPTION_H, GAP, FRAME = 120, 28, 8, 3


def sheets(
    run_dirs: Sequence[Path], per_mode: int = 6, scale: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """The "before" and "after" sheets of the runs' modes, one row per mode, in case order.

    The cases are the first `per_mode` of each mode, not picked. Each result is framed green
    (success) or red (failure, with the criteria it missed under it).

    Args:
        run_dirs: folders written by `dragonctl bench quality`; a mode may be in only one.
        per_mode: cases per row.
        scale: enlargement (whole pixels, so the edges show as they are).
    """
    from dragonctl import api
    from dragonctl.bench.quality import CASE_SETS

    found: dict[str, tuple[Path, dict]] = {}
    for run in run_dirs:
        summary = _summary(run)
        for mode, m in summary["modes"].items():
            if mode in found:
                raise UsageError(
                    f"{run}: mode {mode} is also in {found[mode][0]}; give one run a mode"
                )
            found[mode] = (run, m)
    before_rows, after_rows = [], []
    for mode in sorted(found, key=lambda m: CASE_SETS.index(m) if m in CASE_SETS else 99):
        run, m = found[mode]
        cases = [c for c in m["per_case"] if c["ok"]][:per_mode]
        label = f"{mode}\n{m['successes']}/{m['completed']} succeed"
        befores, afters = [], []
        for case in cases:
            ls, inp = api.load(run / mode / f"{case['case']}.yaml")
            result = np.asarray(
                Image.open(run / mode / "out" / f"{case['case']}.png").convert("RGB")
            )
            befores.append(_cell(_enlarge(api.preview_image(ls, inp), scale), case["case"]))
            colour = SUCCESS if case["success"] else FAILURE
            caption = "ok" if case["success"] else "failed: " + ", ".join(case["failed"])
            afters.append(_cell(_enlarge(np.asarray(result), scale), caption, colour))
        before_rows.append(_row(label, befores))
        after_rows.append(_row(label, afters))
    if not before_rows:
        raise UsageError(f"{', '.join(map(str, run_dirs))}: no completed cases to show")
    return _stack(before_rows), _stack(after_rows)


def _summary(run: Path) -> dict:
    path = run / "quality.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError.one(path, "", "not found; give `bench quality` folders") from None
    except json.JSONDecodeError as e:
        raise SpecError.one(path, "", f"not JSON ({e})") from None


def _enlarge(img: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(img, scale, 0), scale, 1)


def _cell(
    img: np.ndarray, caption: str, frame: tuple[int, int, int] = (255, 255, 255)
) -> np.ndarray:
    """The image in a frame of `frame`'s colour, over a caption of up to two lines."""
    h, w = img.shape[:2]
    cell = Image.new("RGB", (w + 2 * FRAME, h + 2 * FRAME + CAPTION_H), (255, 255, 255))
    cell.paste(Image.new("RGB", (w + 2 * FRAME, h + 2 * FRAME), frame), (0, 0))
    cell.paste(Image.fromarray(img), (FRAME, FRAME))
    draw = ImageDraw.Draw(cell)
    for k, line in enumerate(_wrap(caption, max(8, w // 6))[:2]):
        draw.text((2, h + 2 * FRAME + 2 + 12 * k), line, fill=(0, 0, 0))
    return np.asarray(cell)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.replace(", ", ",\u0000").split("\u0000"):
        if line and len(line) + len(word) > width:
            lines.append(line)
            line = ""
        line += word
    return [*lines, line] if line else lines


def _row(label: str, cells: list[np.ndarray]) -> np.ndarray:
    h = max(c.shape[0] for c in cells) if cells else CAPTION_H
    head = Image.new("RGB", (LABEL_W, h), (255, 255, 255))
    ImageDraw.Draw(head).multiline_text((4, h // 2 - 12), label, fill=(0, 0, 0))
    parts = [np.asarray(head)]
    for c in cells:
        parts.append(_pad_to(c, h, c.shape[1] + GAP))
    return np.concatenate(parts, axis=1)


def _pad_to(img: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.pad(img, ((0, h - img.shape[0]), (0, w - img.shape[1]), (0, 0)), constant_values=255)


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    w = max(r.shape[1] for r in rows)
    return np.concatenate([_pad_to(r, r.shape[0] + GAP, w) for r in rows])
