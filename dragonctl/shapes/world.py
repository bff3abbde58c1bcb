"""The synthetic "shapes" world: flat-coloured shapes on smooth backgrounds, with exact ground
truth.

A `Scene` is a plain description (background corner colours and texture, a list of `Shape`s);
`render` turns it into an image plus one exact mask per object. Edits for the quality benchmark
are expressed as new scenes (a shape moved, scaled, recoloured), so their ground truth is just
another render.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

KINDS = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Shape:
    kind: str
    cx: float
    cy: float
    size: float  # side of the bounding square, px
    color: tuple[float, float, float]  # RGB in [0, 1]

    def moved(self, dx: float, dy: float) -> Shape:
        return replace(self, cx=self.cx + dx, cy=self.cy + dy)

    def scaled(self, s: float) -> Shape:
        return replace(self, size=self.size * s)


@dataclass(frozen=True)
class Scene:
    size: int
    corners: tuple[tuple[float, float, float], ...]  # TL, TR, BL, BR background colours
    texture: tuple[float, ...]  # (amplitude, fx, fy, phase) of a faint low-frequency wave
    shapes: tuple[Shape, ...] = field(default_factory=tuple)

    def with_shape(self, index: int, shape: Shape) -> Scene:
        shapes = list(self.shapes)
        shapes[index] = shape
        return replace(self, shapes=tuple(shapes))


@dataclass
class Rendered:
    image: np.ndarray  # H×W×3 float32 in [0, 1]
    masks: list[np.ndarray]  # one H×W bool per shape: its visible pixels
    centroids: list[tuple[float, float]]  # (x, y) of each visible mask, px
    colors: list[tuple[float, float, float]]

    def to_uint8(self) -> np.ndarray:
        return np.clip(np.round(self.image * 255.0), 0, 255).astype(np.uint8)


def shape_mask(shape: Shape, size: int) -> np.ndarray:
    """Exact pixel mask of one shape (pixel centres at integer + 0.5)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    half = shape.size / 2.0
    dx, dy = xs - shape.cx, ys - shape.cy
    if shape.kind == "circle":
        return dx * dx + dy * dy <= half * half
    if shape.kind == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape.kind == "triangle":
        # Upright isosceles triangle inscribed in the bounding square.
        top, bottom = -half, half
        inside_y = (dy >= top) & (dy <= bottom)
        frac = (dy - top) / max(shape.size, 1e-6)  # 0 at the apex, 1 at the base
        return inside_y & (np.abs(dx) <= half * frac)
    raise ValueError(f"unknown shape kind {shape.kind!r}")


def background(scene: Scene) -> np.ndarray:
    n = scene.size
    t = (np.arange(n, dtype=np.float32) + 0.5) / n
    u, v = np.meshgrid(t, t)  # u: x, v: y
    tl, tr, bl, br = (np.asarray(c, dtype=np.float32) for c in scene.corners)
    img = (
        (1 - u)[..., None] * (1 - v)[..., None] * tl
        + u[..., None] * (1 - v)[..., None] * tr
        + (1 - u)[..., None] * v[..., None] * bl
        + u[..., None] * v[..., None] * br
    )
    amp, fx, fy, phase = scene.texture
    wave = amp * np.sin(2 * math.pi * (fx * u + fy * v) + phase)
    return np.clip(img + wave[..., None], 0.0, 1.0).astype(np.float32)


def render(scene: Scene) -> Rendered:
    img = background(scene)
    full = [shape_mask(s, scene.size) for s in scene.shapes]
    visible = []
    for i, (s, m) in enumerate(zip(scene.shapes, full)):
        img[m] = np.asarray(s.color, dtype=np.float32)
        later = np.zeros_like(m)
        for m2 in full[i + 1 :]:
            later |= m2
        visible.append(m & ~later)
    centroids = []
    for m in visible:
        ys, xs = np.nonzero(m)
        centroids.append(
            (float(xs.mean() + 0.5), float(ys.mean() + 0.5)) if len(xs) else (math.nan, math.nan)
        )
    return Rendered(img, visible, centroids, [s.color for s in scene.shapes])


def _color_far(rng: np.random.Generator, avoid: list[np.ndarray], min_dist: float) -> np.ndarray:
    best, best_d = None, -1.0
    for _ in range(64):
        c = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        d = min((float(np.linalg.norm(c - a)) for a in avoid), default=9.0)
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best  # type: ignore[return-value]


def random_scene(
    rng: np.random.Generator,
    size: int = 64,
    n_shapes: tuple[int, int] = (1, 3),
    shape_size: tuple[float, float] = (10.0, 24.0),
    flat_background: bool = False,
) -> Scene:
    """A random scene whose shapes do not overlap and keep clear of the background's colours."""
    base = rng.uniform(0.15, 0.85, 3)
    if flat_background:
        corners = [base] * 4
        texture = (0.0, 0.0, 0.0, 0.0)
    else:
        corners = [np.clip(base + rng.normal(0, 0.18, 3), 0, 1) for _ in range(4)]
        texture = (
            float(rng.uniform(0.0, 0.04)),
            float(rng.uniform(0.5, 2.0)),
            float(rng.uniform(0.5, 2.0)),
            float(rng.uniform(0, 2 * math.pi)),
        )
    avoid = [np.asarray(c, dtype=np.float32) for c in corners]
    shapes: list[Shape] = []
    n = int(rng.integers(n_shapes[0], n_shapes[1] + 1))
    for _ in range(n):
        for _attempt in range(50):
            s = float(rng.uniform(*shape_size))
            margin = s / 2 + 1
            cx, cy = (float(v) for v in rng.uniform(margin, size - margin, 2))
            if all(math.hypot(cx - o.cx, cy - o.cy) > (s + o.size) / 2 + 2 for o in shapes):
                break
        else:
            continue
        color = _color_far(rng, avoid, 0.45)
        avoid.append(color)
        shapes.append(Shape(str(rng.choice(KINDS)), cx, cy, s, tuple(float(c) for c in color)))
    return Scene(size, tuple(tuple(float(x) for x in c) for c in corners), texture, tuple(shapes))


def batch(rng: np.random.Generator, n: int, size: int = 64, flat_share: float = 0.0) -> np.ndarray:
    """n random images as an n×3×size×size float32 array in [-1, 1] (the training data).

    flat_share: the expected share of scenes on a flat background (the others get gradients).
    """
    out = np.empty((n, 3, size, size), dtype=np.float32)
    k = size / 64  # shapes keep their share of the frame at any size
    flat = rng.random(n) < flat_share if flat_share else np.zeros(n, dtype=bool)
    for i in range(n):
        scene = random_scene(rng, size, shape_size=(10.0 * k, 24.0 * k), flat_background=flat[i])
        out[i] = render(scene).image.transpose(2, 0, 1) * 2.0 - 1.0
    return out
