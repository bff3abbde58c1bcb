"""Edit-quality benchmark on the shapes world, where the ground truth of every edit is known.

Each case is a held-out scene (generator keys never used in training), a spec written the way a
user would (exact PNG masks or boxes with a few pixels of margin, flat and gradient backgrounds),
run through the real engine via the public API, and scored against the ground-truth render:

- move: centroid error (px), IoU with the target mask, residue at the vacated place, background PSNR
- resize: area-ratio error, IoU with the scaled object
- drag: distance of the dragged object's colour centroid to where the handle's content should be
- drag_part: the same, for a drag of the object's far edge with an editable region that covers
  only the part beyond its centre line: the object must stretch, its fixed part stay
- appearance: colour distance to the reference colour, shape IoU with the original, background PSNR
- paste: IoU and colour distance at the destination, background PSNR

Two controls get the same figures: plain reconstruction (DDIM inversion of the source and plain
DDIM back, no guidance), and the zero predictor: the same edit with the denoiser's prediction
replaced by zeros (features, memory bank and energies untouched), so whatever the latent
operations and the energies' gradients do without the model. A case the zero predictor passes
says nothing about the model. A zero predictor hands back the initial latent, so the reference's
own latent placements are the known exceptions: paste (the placed reference's inverted latent),
growing resizes (the object's scaled over its old place) and short partial drags (the handle's
latent patch copied onto the target).

Two worlds (`WORLDS`): flat (flat-coloured shapes on flat or smooth gradient backgrounds) and
textured (patterned backgrounds, shaded and patterned neighbours that may cover part of the
edited object, soft shadows), where the place an object leaves must be generated: `vacated_psnr`
compares it with the background continued.

Cases vary the way users' specs do: one to three objects per scene, flat and gradient
backgrounds, masks as exact PNGs, tight and loose boxes and polygons, edits that end next to
another object or near the frame. Every case gets a verdict (`bench.success`): success, or the
criteria it failed; the run reports success rates per mode and a contact sheet of the failures.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from dragonctl.bench import success
from dragonctl.geometry import polygon_mask
from dragonctl.shapes.world import Scene, Shape, render
from dragonctl.spec import MODES

# The edit modes, then drag_part: a drag whose editable region covers only the part of the object
# beyond a cut, so the handle's content must move and the rest stay (the object is stretched).
CASE_SETS = (*MODES, "drag_part")
WORLD = 64  # the case generator's units: the shapes world's side in px

# RGB distance (in [0, 1] units) under which a pixel counts as the object's colour
COLOR_TOL = success.COLOUR_DISTANCE / 255


@dataclass
class Case:
    mode: str
    name: str
    spec: dict  # the spec's fields (image paths filled in when written)
    source: np.ndarray
    truth: np.ndarray  # ground-truth result
    old_mask: np.ndarray  # the edited object before
    new_mask: np.ndarray  # ... and after (ground truth)
    color: tuple[float, float, float]  # the colour expected in new_mask
    edit_region: np.ndarray  # pixels the edit may change (for background PSNR: outside, dilated)
    reference: np.ndarray | None = None
    reference_mask: np.ndarray | None = None


def _dilate(m: np.ndarray, n: int) -> np.ndarray:
    from dragonctl.geometry import dilate

    return dilate(m, n)


def _scene(
    rng: np.random.Generator, flat: bool, n_other: int, size: int = 64, world: str = "flat"
) -> tuple[Scene, Shape]:
    """A scene with one main object (kept clear of the frame edges) and n_other others; in the
    textured world over a patterned background, with shadows, the others shaded or patterned and
    free to cover part of the main object."""
    from dragonctl.shapes.world import random_scene

    textured = world == "textured"
    while True:
        sc = random_scene(
            rng,
            size,
            n_shapes=(1 + n_other, 1 + n_other),
            shape_size=(12.0, 18.0),
            flat_background=flat and not textured,
            textured=textured,
            overlap=textured,
        )
        if len(sc.shapes) == 1 + n_other:
            return sc, sc.shapes[0]


def _free(sc: Scene, cand: Shape, skip: int, margin: float = 3.0) -> bool:
    half = cand.size / 2
    if not (
        half + 1 <= cand.cx <= sc.size - half - 1 and half + 1 <= cand.cy <= sc.size - half - 1
    ):
        return False
    return all(
        math.hypot(cand.cx - o.cx, cand.cy - o.cy) > (cand.size + o.size) / 2 + margin
        for k, o in enumerate(sc.shapes)
        if k != skip
    )


def _box(mask: np.ndarray, margin: int, size: int) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [
        max(0, int(xs.min()) - margin),
        max(0, int(ys.min()) - margin),
        min(size, int(xs.max()) + 1 + margin),
        min(size, int(ys.max()) + 1 + margin),
    ]


MASK_STYLES = ("png", "box", "loose_box", "polygon")  # how case k's masks are drawn: k mod 4
WORLDS = ("flat", "textured")  # the flat world (the first model's) and the textured one


def make_cases(
    mode: str, n: int, seed: int = 1000, size: int = WORLD, world: str = "flat"
) -> list[Case]:
    """n cases of a mode (or of drag_part, see `CASE_SETS`) in one of the `WORLDS`. Scenes and
    edits are drawn in the world's 64-px units and rendered at `size`, with every coordinate
    scaled: the cases at 128 px are the cases at 64, drawn finer."""
    cases = []
    k = 0
    key = [] if world == "flat" else [WORLDS.index(world)]  # the flat world's keys as they were
    while len(cases) < n:
        rng = np.random.default_rng([seed, CASE_SETS.index(mode), k, *key])
        k += 1
        style = MASK_STYLES[len(cases) % 4]
        case = _make_case(mode, rng, style, len(cases), size / WORLD, world)
        if case is not None:
            cases.append(case)
    return cases


class Draw:
    """Renders world scenes at k times the world's 64 px, and scales lengths with them."""

    def __init__(self, k: float) -> None:
        self.k = k

    def __call__(self, sc: Scene):
        k = self.k
        shapes = tuple(replace(o, cx=o.cx * k, cy=o.cy * k, size=o.size * k) for o in sc.shapes)
        return render(replace(sc, size=round(sc.size * k), shapes=shapes))

    def px(self, n: float) -> int:
        return round(n * self.k)


def _make_case(
    mode: str,
    rng: np.random.Generator,
    style: str,
    index: int,
    scale: float = 1.0,
    world: str = "flat",
) -> Case | None:
    """One case; None when the drawn scene leaves no room for the edit (the caller draws again)."""
    flat, others = bool(rng.integers(0, 2)), int(rng.integers(0, 3))
    sc, obj = _scene(rng, flat, n_other=others, world=world)
    draw = Draw(scale)
    src = draw(sc)
    name = f"{mode}-{index:02d}"
    mask_spec = _mask_spec(src.masks[0], style, rng, draw)
    # every third case may end next to another object (1 px apart), the others keep 3 px
    near = 1.0 if index % 3 == 2 else 3.0
    if mode in ("move", "resize"):
        return _move_case(mode, name, rng, sc, obj, src, mask_spec, near, draw)
    if mode == "drag":
        return _drag_case(name, rng, sc, obj, src, style, near, draw)
    if mode == "drag_part":
        return _partial_drag_case(name, rng, sc, obj, src, style, near, draw)
    return _two_image_case(mode, name, rng, sc, obj, src, mask_spec, style, near, draw, world)


def _mask_spec(mask: np.ndarray, style: str, rng: np.random.Generator, draw: Draw) -> object:
    """The object's mask as a user would give it ("mask": the exact PNG)."""
    size = mask.shape[0]
    if style == "box":
        return {"box": _box(mask, draw.px(2), size)}
    if style == "loose_box":
        return {"box": _box(mask, draw.px(int(rng.integers(4, 9))), size)}
    if style == "polygon":
        return {"polygon": _hull(_dilate(mask, draw.px(int(rng.integers(2, 5)))))}
    return "mask"


def _hull(mask: np.ndarray) -> list[list[float]]:
    """The convex hull of a mask's pixel squares (Andrew's monotone chain), as polygon vertices."""
    ys, xs = np.nonzero(mask)
    pts = sorted(
        {(float(x + dx), float(y + dy)) for x, y in zip(xs, ys) for dx in (0, 1) for dy in (0, 1)}
    )

    def half(points):
        out: list[tuple[float, float]] = []
        for p in points:
            while len(out) >= 2 and _cross(out[-2], out[-1], p) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    return [list(p) for p in half(pts) + half(pts[::-1])]


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _move_case(
    mode, name, rng, sc: Scene, obj: Shape, src, mask_spec, near: float, draw: Draw
) -> Case | None:
    for _ in range(40):
        if mode == "move":
            dx, dy = (float(v) for v in rng.integers(-24, 25, 2))
            if math.hypot(dx, dy) < 8:
                continue
            new = obj.moved(dx, dy)
            spec = {"mode": "move", "mask": mask_spec, "offset": [dx * draw.k, dy * draw.k]}
        else:
            s = float(rng.choice([0.7, 0.8, 1.25, 1.4]))
            new = obj.scaled(s)
            spec = {"mode": "resize", "mask": mask_spec, "scale": s}
        if _free(sc, new, 0, near):
            break
    else:
        return None
    truth = draw(sc.with_shape(0, new))
    old = src.masks[0]
    return Case(
        mode,
        name,
        spec,
        src.to_uint8(),
        truth.to_uint8(),
        old_mask=old,
        new_mask=truth.masks[0],
        color=obj.color,
        edit_region=old | truth.masks[0],
    )


def _drag_case(
    name, rng, sc: Scene, obj: Shape, src, style: str, near: float, draw: Draw
) -> Case | None:
    for _ in range(40):
        dx, dy = (float(v) for v in rng.integers(-12, 13, 2))
        if math.hypot(dx, dy) < 6:
            continue
        new = obj.moved(dx, dy)
        if _free(sc, new, 0, near):
            break
    else:
        return None
    truth = draw(sc.with_shape(0, new))
    old = src.masks[0]
    size = old.shape[0]
    region = _dilate(old | truth.masks[0], draw.px(4))
    box = _box(region, draw.px(4) if style == "loose_box" else 0, size)
    hx, hy = src.centroids[0]
    boxed = style in ("box", "loose_box")
    spec = {
        "mode": "drag",
        "points": [[[hx, hy], [hx + dx * draw.k, hy + dy * draw.k]]],
        "mask": {"box": box} if boxed else "mask",
    }
    return Case(
        "drag",
        name,
        spec,
        src.to_uint8(),
        truth.to_uint8(),
        old_mask=old,
        new_mask=truth.masks[0],
        color=obj.color,
        edit_region=_box_mask(box, size) if boxed else region,
    )


DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}


def stretched(mask: np.ndarray, cut: int, n: int, direction: str) -> np.ndarray:
    """The mask stretched by n px in a direction at a cut line: what lies before the cut stays,
    what lies beyond moves n px on, and the line at the cut fills the gap (a square becomes a
    longer rectangle, a circle a stadium)."""
    vertical, backwards = direction in ("down", "up"), direction in ("left", "up")
    m = mask.T if vertical else mask
    if backwards:
        m, cut = m[:, ::-1], m.shape[1] - cut
    out = np.zeros_like(m)
    out[:, :cut] = m[:, :cut]
    out[:, cut : cut + n] = m[:, cut : cut + 1]
    out[:, cut + n :] = m[:, cut : m.shape[1] - n]
    if backwards:
        out = out[:, ::-1]
    return np.ascontiguousarray(out.T if vertical else out)


def _beyond(size: int, cut: int, direction: str) -> np.ndarray:
    """The half-plane a partial drag may edit: from the cut line on, in the drag's direction."""
    rows, cols = slice(None), slice(None)
    if direction in ("right", "left"):
        cols = slice(cut, None) if direction == "right" else slice(None, cut)
    else:
        rows = slice(cut, None) if direction == "down" else slice(None, cut)
    m = np.zeros((size, size), dtype=bool)
    m[rows, cols] = True
    return m


def _partial_drag_case(
    name, rng, sc: Scene, obj: Shape, src, style: str, near: float, draw: Draw
) -> Case | None:
    """Drag the object's far edge n px on, editing only beyond its centre line: it stretches."""
    # a triangle stretched along its axis would grow a neck: triangles stretch sideways only
    direction = str(rng.choice(list(DIRECTIONS)[: 2 if obj.kind == "triangle" else 4]))
    n = int(rng.integers(5, 11))
    ux, uy = DIRECTIONS[direction]
    # the stretched object's bounds, for the room check: the object moved n/2 on and n larger
    bounds = Shape(obj.kind, obj.cx + ux * n / 2, obj.cy + uy * n / 2, obj.size + n, obj.color)
    if not (_free(sc, obj, 0, 0.0) and _free(sc, bounds, 0, near)):
        return None
    old = src.masks[0]
    size = old.shape[0]
    centre = (draw.px(obj.cx), draw.px(obj.cy))
    cut = centre[0] if ux else centre[1]
    new = stretched(old, cut, draw.px(n), direction)
    truth = src.image.copy()
    truth[new] = np.asarray(obj.color, dtype=np.float32)
    # the handle: one world px inside the object's edge, on its centre line
    line = old[centre[1]] if ux else old[:, centre[0]]
    inside = np.nonzero(line)[0]
    edge = (inside.max() + 0.5 - draw.k) if ux + uy > 0 else (inside.min() + 0.5 + draw.k)
    hx, hy = (float(edge), centre[1] + 0.5) if ux else (centre[0] + 0.5, float(edge))
    region = _dilate(new, draw.px(4)) & _beyond(size, cut, direction)
    if style in ("box", "loose_box"):
        box = _box(region, draw.px(4) if style == "loose_box" else 0, size)
        box[{"right": 0, "down": 1, "left": 2, "up": 3}[direction]] = cut  # not behind the cut
        region = _box_mask(box, size)
        mask_spec: object = {"box": box}
    elif style == "polygon":
        hull = _hull(region)
        region = polygon_mask(hull, size, size)
        mask_spec = {"polygon": hull}
    else:
        mask_spec = "mask"
    spec = {
        "mode": "drag",
        "points": [[[hx, hy], [hx + ux * n * draw.k, hy + uy * n * draw.k]]],
        "mask": mask_spec,
    }
    return Case(
        "drag",
        name,
        spec,
        src.to_uint8(),
        np.clip(np.round(truth * 255.0), 0, 255).astype(np.uint8),
        old_mask=old,
        new_mask=new,
        color=obj.color,
        edit_region=region,
    )


def _two_image_case(
    mode,
    name,
    rng,
    sc: Scene,
    obj: Shape,
    src,
    mask_spec,
    style: str,
    near: float,
    draw: Draw,
    world: str = "flat",
) -> Case | None:
    """Appearance and paste: the reference holds one object of another colour."""
    ref_sc, ref_obj = _scene(rng, flat=bool(rng.integers(0, 2)), n_other=0, world=world)
    if np.linalg.norm(np.subtract(ref_obj.color, obj.color)) < 0.5:
        return None
    ref = draw(ref_sc)
    ref_box = _box(ref.masks[0], draw.px(2), ref.masks[0].shape[0])
    ref_mask: object = {"box": ref_box} if style != "png" else "ref_mask"
    reference = {"image": "reference", "mask": ref_mask}
    old = src.masks[0]
    if mode == "appearance":
        truth = draw(sc.with_shape(0, Shape(obj.kind, obj.cx, obj.cy, obj.size, ref_obj.color)))
        spec = {"mode": "appearance", "mask": mask_spec, "reference": reference}
        return Case(
            mode,
            name,
            spec,
            src.to_uint8(),
            truth.to_uint8(),
            old_mask=old,
            new_mask=old,
            color=ref_obj.color,
            edit_region=old,
            reference=ref.to_uint8(),
            reference_mask=ref.masks[0],
        )
    for _ in range(60):  # paste: put the reference object somewhere free in the source
        s = float(rng.choice([0.8, 1.0, 1.2]))
        cx, cy = (float(v) for v in rng.uniform(12, sc.size - 12, 2))
        placed = Shape(ref_obj.kind, cx, cy, ref_obj.size * s, ref_obj.color)
        with_placed = replace(sc, shapes=sc.shapes + (placed,))
        if not _free(with_placed, placed, len(sc.shapes), near):
            continue
        truth = draw(with_placed)
        new = truth.masks[-1]
        # a pasted object the colour of what it covers could not be told from doing nothing
        if color_mask(src.to_uint8(), ref_obj.color)[new].mean() < 0.05:
            break
    else:
        return None
    spec = {"mode": "paste", "reference": reference, "at": [cx * draw.k, cy * draw.k], "scale": s}
    return Case(
        mode,
        name,
        spec,
        src.to_uint8(),
        truth.to_uint8(),
        old_mask=np.zeros_like(new),
        new_mask=new,
        color=ref_obj.color,
        edit_region=new,
        reference=ref.to_uint8(),
        reference_mask=ref.masks[0],
    )


def _box_mask(box: list[int], size: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[box[1] : box[3], box[0] : box[2]] = True
    return m


def write_case(case: Case, folder: Path, model: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(case.source).save(folder / f"{case.name}.png")
    Image.fromarray(case.old_mask.astype(np.uint8) * 255).save(folder / f"{case.name}_mask.png")
    spec = {
        "version": 1,
        "image": f"{case.name}.png",
        **json.loads(json.dumps(case.spec)),
        "model": model,
        "output": f"out/{case.name}.png",
    }
    if case.mode == "drag" and spec.get("mask") == "mask":
        Image.fromarray(case.edit_region.astype(np.uint8) * 255).save(
            folder / f"{case.name}_region.png"
        )
        spec["mask"] = f"{case.name}_region.png"
    elif spec.get("mask") == "mask":
        spec["mask"] = f"{case.name}_mask.png"
    if case.reference is not None and case.reference_mask is not None:
        Image.fromarray(case.reference).save(folder / f"{case.name}_ref.png")
        spec["reference"]["image"] = f"{case.name}_ref.png"
        if spec["reference"]["mask"] == "ref_mask":
            Image.fromarray(case.reference_mask.astype(np.uint8) * 255).save(
                folder / f"{case.name}_refmask.png"
            )
            spec["reference"]["mask"] = f"{case.name}_refmask.png"
    path = folder / f"{case.name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# --- metrics -----------------------------------------------------------------------------------


def color_mask(
    img: np.ndarray, color: tuple[float, float, float], tol: float = COLOR_TOL
) -> np.ndarray:
    d = np.linalg.norm(img.astype(np.float32) / 255 - np.asarray(color, dtype=np.float32), axis=-1)
    return d < tol


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    if not where.any():
        return float("nan")
    mse = float(np.mean((a[where].astype(np.float64) - b[where].astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    u = (a | b).sum()
    return float((a & b).sum() / u) if u else 1.0


def centroid(m: np.ndarray) -> tuple[float, float] | None:
    ys, xs = np.nonzero(m)
    return (float(xs.mean() + 0.5), float(ys.mean() + 0.5)) if len(xs) else None


def _centroid_error(found: np.ndarray, truth: np.ndarray) -> float:
    """Distance between centroids; the frame's size when nothing of the object was found."""
    c, t = centroid(found), centroid(truth)
    return math.hypot(c[0] - t[0], c[1] - t[1]) if c and t else float(found.shape[0])


def score(case: Case, result: np.ndarray) -> dict[str, float]:
    # Pixels outside the object that have its colour in the ground truth too (a background gradient
    # passing through it) are not the object: a perfect edit must score perfectly.
    cm = color_mask(result, case.color) & ~(color_mask(case.truth, case.color) & ~case.new_mask)
    rim = round(2 * case.source.shape[0] / WORLD)  # 2 px of the world's 64
    # what the truth changes besides the object: its soft shadow (the textured world's)
    shadow = (case.truth != case.source).any(-1) & ~(case.old_mask | case.new_mask)
    region = case.edit_region | shadow
    background = ~_dilate(region, rim)
    # far from the edit (a fifth of the image away): where a composited result is the source's own
    far = ~_dilate(region, case.source.shape[0] // 5)
    objects = _dilate(case.old_mask | case.new_mask | shadow, rim)
    vacated = case.old_mask & ~case.new_mask
    # the old place's object colour is a copy left behind, but not a pixel off the new outline:
    # that is the outline's own rasterisation (a resampled 10-px triangle differs there)
    left = vacated & ~_dilate(case.new_mask, max(1, rim // 2))
    out: dict[str, float] = {
        "background_psnr": psnr(result, case.source, background),
        "far_psnr": psnr(result, case.source, far),
        "cleanliness": success.cleanliness(result, case.source, ~objects),
        # object-coloured pixels away from the truth's object and its old place: a second copy
        "stray": float((cm & ~_dilate(case.new_mask, rim) & ~vacated).sum() / case.new_mask.sum()),
        "residue": float(cm[left].mean()) if left.any() else 0.0,
        # the place the object left, against the truth (the background continued there): a
        # figure, not a criterion
        "vacated_psnr": psnr(result, case.truth, vacated) if vacated.any() else float("nan"),
    }
    if case.mode in ("move", "resize", "drag"):
        present = cm & ~vacated
        out["centroid_error"] = _centroid_error(present, case.new_mask)
        # a resized object is judged whole: an object that failed to shrink must not pass by its
        # core
        found = cm if case.mode == "resize" else present
        out["iou"] = iou(found, case.new_mask)
        if case.mode == "resize":
            out["area_ratio_error"] = abs(found.sum() / max(case.new_mask.sum(), 1) - 1.0)
    else:  # appearance (the object keeps its place) and paste (it appears at its destination)
        found = cm
        px = result[case.new_mask].astype(np.float32) / 255
        out["color_distance"] = float(np.linalg.norm(px.mean(axis=0) - np.asarray(case.color)))
        out["shape_iou" if case.mode == "appearance" else "iou"] = iou(cm, case.new_mask)
        out["centroid_error"] = _centroid_error(cm, case.new_mask)
    out["found_area"] = float(found.sum())
    out["area_error"] = abs(found.sum() / max(case.new_mask.sum(), 1) - 1.0)
    return out


# --- running -------------------------------------------------------------------------------------


def reconstruct(
    editor,
    image: np.ndarray,
    steps: int,
    refine: int = 0,
    resolution: int = 64,
    image_bytes: bytes | None = None,
    prompt: str = "",
    max_resolution: int | None = None,
) -> np.ndarray:
    """The no-guidance baseline: DDIM inversion of the source and plain DDIM back from its noise,
    through the sampler's own loop (no bank, no guidance).

    Given the source file's bytes and the edit's prompt, the edit's own inversion is reused.
    """
    import torch

    from dragonctl.attention import BankState
    from dragonctl.engine import to_uint8
    from dragonctl.sampler import Prompts, UNetCalls
    from dragonctl.sampler import reconstruct as plain_ddim
    from dragonctl.schedules import Schedule

    b = editor.bundle
    frame = editor.frame_for(image, resolution, max_resolution)
    schedule = Schedule.from_config(b.scheduler_config, steps)
    work = frame.image_to_work(image)
    traj = editor.trajectory(work, image_bytes or work.tobytes(), prompt, schedule, refine=refine)
    with torch.no_grad():
        ctx = b.encode_prompt([prompt])
        calls = UNetCalls(
            editor.forward, editor.features, b.dtype, b.prediction_type, schedule, b.device
        )
        z = plain_ddim(calls, traj, Prompts.build([ctx], ctx, cfg=False), BankState())
        return frame.image_to_source(to_uint8(b.decode_latent(z)))


def zero_predictor(editor) -> None:
    """Turn an editor into the control: its denoiser predicts zeros everywhere (inversion and
    sampling), while the guidance features, the bank and the energies stay the model's. Its
    identity changes with it, so it never shares an inversion with the real model."""
    import dataclasses

    import torch

    def zeros(z, _t, _context):
        return torch.zeros_like(z)

    editor.forward = zeros
    b = editor.bundle
    editor.bundle = dataclasses.replace(b, weights_hash=b.weights_hash + "+zero-predictor")
    editor.forget_trajectories()


def _median(values: list[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.median(v)) if v else float("nan")


def run(
    out_dir: Path,
    modes: tuple[str, ...] = CASE_SETS,
    cases: int = 6,
    model: str = "shapes",
    seed: int = 1000,
    overrides: dict | None = None,
    log=print,
    spec_overrides: dict | None = None,
    size: int | None = None,
    baseline: bool = True,
    control: bool = True,
    world: str = "flat",
) -> dict:
    """Run the benchmark; writes specs, results, contact sheets and `quality.json` under out_dir.

    Args:
        overrides: guidance settings for every case; spec_overrides: top-level spec fields.
        size: the cases' side in px; default: a shapes model's own working size, else 64.
        world: which of the `WORLDS` the cases are drawn from.
        baseline: also score plain reconstruction of each source.
        control: also run each case with the zero predictor (`zero_predictor`): about as much
            work again as the edit.
    """
    from dragonctl import api
    from dragonctl.files import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    opts = api.EditOptions(no_cache=True, metadata=False)
    session = api.Session(opts)
    session.editor(model)  # a model that does not load fails the run here, not once per case
    controls = None
    if control:
        controls = api.Session(opts)
        zero_predictor(controls.editor(model))
    size = size or case_size(model)
    summary: dict = {
        "model": model,
        "cases_per_mode": cases,
        "seed": seed,
        "size": size,
        "world": world,
        "modes": {},
    }
    for mode in modes:
        rows, failed, per_case = [], [], []
        for case in make_cases(mode, cases, seed, size, world):
            path = write_case(case, out_dir / mode, model)
            _override(path, overrides, spec_overrides)
            record, row = run_case(session, opts, case, path, log, baseline, controls)
            per_case.append(record)
            if row is not None:
                rows.append(row)
                if record["failed"]:
                    failed.append((row, f"{case.name}\nfailed: " + ", ".join(record["failed"])))
        if rows:
            _save_sheet(rows, out_dir / f"sheet_{mode}.png", max(1, 3 * WORLD // size))
        gallery = success.failure_sheet(failed, max(1, 3 * WORLD // size))
        if gallery is not None:
            Image.fromarray(gallery).save(out_dir / f"failures_{mode}.png")
        summary["modes"][mode] = _mode_summary(per_case)
    atomic_write(out_dir / "quality.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def _save_sheet(rows: list[np.ndarray], path: Path, scale: int = 3) -> None:
    sheet = np.concatenate([np.pad(r, ((0, 4), (0, 0), (0, 0)), constant_values=255) for r in rows])
    Image.fromarray(sheet).resize(
        (sheet.shape[1] * scale, sheet.shape[0] * scale), Image.Resampling.NEAREST
    ).save(path)


def case_size(model: str) -> int:
    """A shapes model's cases are drawn at its own working size; other models get the world's."""
    from dragonctl.families import family_for_model
    from dragonctl.spec import defaults_for

    if family_for_model(model).startswith("shapes"):
        return int(defaults_for(model, "move")["resolution"])
    return WORLD


def _override(path: Path, guidance: dict | None, fields: dict | None) -> None:
    if not (guidance or fields):
        return
    data = yaml.safe_load(path.read_text())
    data.update(fields or {})
    if guidance:
        data.setdefault("guidance", {}).update(guidance)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def run_case(
    session, opts, case: Case, path: Path, log, baseline: bool = True, controls=None
) -> tuple[dict, np.ndarray | None]:
    """Edit one case through the public API and score it, its baseline, and its zero-predictor
    control (`controls`: a session whose editor is `zero_predictor`'s); returns its record and its
    contact-sheet row (None when the edit failed)."""
    from dragonctl import api
    from dragonctl.preview import side_by_side

    ls, inp = api.load(path)
    t0 = time.perf_counter()
    rep = api.edit_one(session, ls, inp, api.output_path(ls, None, None), opts, None)
    seconds = time.perf_counter() - t0
    if not rep.ok:
        log(f"{case.name}: FAILED {rep.errors}")
        return {"case": case.name, "ok": False, "errors": rep.errors}, None
    result = np.asarray(Image.open(rep.output).convert("RGB"))
    s = ls.spec
    base = None
    if baseline:
        base = reconstruct(
            session.editor(s.model),
            case.source,
            s.steps,
            refine=s.inversion_refine,
            resolution=s.resolution,
            image_bytes=inp.source_bytes,
            prompt=s.prompt,
            max_resolution=s.max_resolution,
        )
    zero = None
    if controls is not None:
        out = path.parent / "zero-predictor" / f"{case.name}.png"
        ctl = api.edit_one(controls, ls, inp, out, opts, None)
        if ctl.ok:
            zero = np.asarray(Image.open(out).convert("RGB"))
    width = case.source.shape[1]
    m = score(case, result)
    failed = success.verdict(case.mode, m, width)
    b = score(case, base) if base is not None else None
    z = score(case, zero) if zero is not None else None
    outcome = "ok" if not failed else "FAILED " + ",".join(failed)
    control_note = ""
    if z is not None:
        control_note = (
            " (zero predictor: "
            + ("succeeds" if not success.verdict(case.mode, z, width) else "fails")
            + ")"
        )
    log(f"{case.name}: {outcome}{control_note}; " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
    overlay = api.preview_image(ls, inp)[:, : case.source.shape[1]]
    record = {
        "case": case.name,
        "ok": True,
        "seconds": round(seconds, 3),
        "success": not failed,
        "failed": failed,
        "baseline_success": None if b is None else not success.verdict(case.mode, b, width),
        "control_success": None if z is None else not success.verdict(case.mode, z, width),
        "metrics": m,
        "baseline": b,
        "control": z,
    }
    tiles = [case.source, overlay, result, case.truth]
    tiles += [t for t in (zero, base) if t is not None]
    return record, side_by_side(*tiles)


def _mode_summary(per_case: list[dict]) -> dict:
    done = [c for c in per_case if c["ok"]]
    keys = sorted({k for c in done for k in c["metrics"]})
    based = [c for c in done if c["baseline"] is not None]
    controlled = [c for c in done if c.get("control") is not None]
    return {
        "cases": len(per_case),
        "completed": len(done),
        "successes": sum(c["success"] for c in done),
        "baseline_successes": sum(c["baseline_success"] for c in based) if based else None,
        "control_successes": sum(c["control_success"] for c in controlled) if controlled else None,
        # how many cases missed each criterion (a case can miss several)
        "failed_by_criterion": {
            k: n for k in success.CRITERIA if (n := sum(k in c["failed"] for c in done))
        },
        "median": {k: _median([c["metrics"][k] for c in done]) for k in keys},
        "baseline_median": {k: _median([c["baseline"][k] for c in based]) for k in keys}
        if based
        else {},
        "seconds_per_edit": _median([c["seconds"] for c in done]),
        "per_case": per_case,
    }


def success_table(summary: dict) -> str:
    """Per mode: successes of the cases run, the criteria failures missed, and the median
    cleanliness and background."""
    lines = [
        "| mode | success | zero predictor | plain reconstruction | failures by criterion "
        "| cleanliness | background dB | vacated dB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in summary["modes"].items():
        n = m["completed"]
        rate = f"{m['successes']}/{n} ({100 * m['successes'] / max(n, 1):.0f} %)"
        if n < m["cases"]:
            rate += f", {m['cases'] - n} did not run"
        why = ", ".join(f"{k} {v}" for k, v in m["failed_by_criterion"].items()) or "none"
        clean, bg, vac = (
            m["median"].get(k, float("nan"))
            for k in ("cleanliness", "background_psnr", "vacated_psnr")
        )
        base = "—" if m["baseline_successes"] is None else f"{m['baseline_successes']}/{n}"
        zero = m.get("control_successes")
        zero = "—" if zero is None else f"{zero}/{n}"
        lines.append(
            f"| {mode} | {rate} | {zero} | {base} | {why} | {clean:.2f} | {bg:.1f} | {vac:.1f} |"
        )
    return "\n".join(lines)


def table(summary: dict) -> str:
    lines = [
        "| mode | done | metric | result (median) | no-guidance baseline |",
        "|---|---|---|---|---|",
    ]
    for mode, m in summary["modes"].items():
        done = f"{m['completed']}/{m['cases']}"
        for j, (k, v) in enumerate(m["median"].items()):
            lead = f"| {mode} | {done} |" if j == 0 else "| | |"
            base = m["baseline_median"].get(k)
            lines.append(f"{lead} {k} | {v:.3f} | {'—' if base is None else f'{base:.3f}'} |")
        lines.append(f"| | | seconds per edit | {m['seconds_per_edit']:.2f} | |")
    return "\n".join(lines)
