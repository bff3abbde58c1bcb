"""The synthetic "shapes" world: shapes on backgrounds, with exact ground truth.

A `Scene` is a plain description (background corner colours and a faint wave, an optional
`Pattern` over it, soft shadows, a list of `Shape`s, each flat, shaded or patterned); `render`
turns it into an image plus one exact mask per object. Edits for the quality benchmark are
expressed as new scenes (a shape moved, scaled, recoloured), so their ground truth is just another
render: the place an object leaves shows the background's texture continued.

Two worlds are drawn from it: the flat one (flat colours on smooth gradients, the first model's)
and the textured one (`random_scene(textured=True)`: stripes, checks, dots or smooth noise behind
the objects, shaded and patterned objects that may overlap, soft shadows), where a vacated place
or a dragged part must be generated, not filled with a colour. Every length is a fraction of the
frame, so a scene rendered at 128 px is the 64-px scene drawn finer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

KINDS = ("circle", "square", "triangle")
PATTERNS = ("stripes", "checks", "dots", "noise")


@dataclass(frozen=True)
class Pattern:
    """A second colour laid over a background or a shape: stripes, checks, dots or smooth noise.

    period: the pattern's period as a fraction of the frame (of the shape's size on a shape);
    angle in radians; strength: how much of the second colour at the pattern's peaks; waves:
    smooth noise's (amplitude, fx, fy, phase) terms, frequencies in cycles per frame."""

    kind: str
    color: tuple[float, float, float]
    period: float = 0.2
    angle: float = 0.0
    strength: float = 1.0
    waves: tuple[tuple[float, float, float, float], ...] = ()

    def weight(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """The second colour's share at normalised coordinates (u, v), in [0, strength]."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        a, b = (u * c + v * s) / self.period, (-u * s + v * c) / self.period
        if self.kind == "stripes":
            w = 0.5 + 0.5 * np.tanh(3.0 * np.sin(2 * math.pi * a))
        elif self.kind == "checks":
            w = 0.5 + 0.5 * np.tanh(4.0 * np.sin(2 * math.pi * a) * np.sin(2 * math.pi * b))
        elif self.kind == "dots":
            d = np.hypot(a - np.round(a), b - np.round(b))  # distance to the lattice, in periods
            w = 0.5 - 0.5 * np.tanh((d - 0.25) * 24.0)
        elif self.kind == "noise":
            n = sum(
                amp * np.sin(2 * math.pi * (fx * u + fy * v) + ph) for amp, fx, fy, ph in self.waves
            )
            total = sum(abs(w[0]) for w in self.waves) or 1.0
            w = 0.5 + 0.5 * np.asarray(n) / total
        else:
            raise ValueError(f"unknown pattern {self.kind!r}")
        return (self.strength * w).astype(np.float32)


@dataclass(frozen=True)
class Shape:
    kind: str
    cx: float
    cy: float
    size: float  # side of the bounding square, px
    color: tuple[float, float, float]  # RGB in [0, 1]
    shade: float = 0.0  # light falling across the object: ±shade at its edges along shade_angle
    shade_angle: float = 0.0
    pattern: Pattern | None = None  # a pattern in the object's own frame (period: of its size)

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
    pattern: Pattern | None = None  # over the background
    shadow: tuple[float, ...] = ()  # (dx, dy, blur, darkness): dx, dy, blur as frame fractions

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
    img = img + wave[..., None]
    if scene.pattern is not None:
        w = scene.pattern.weight(u, v)[..., None]
        img = img * (1 - w) + w * np.asarray(scene.pattern.color, dtype=np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def shape_colors(shape: Shape, size: int) -> np.ndarray:
    """The shape's colour at every pixel of the frame (meaningful inside its mask): flat, shaded
    along shade_angle, and its pattern laid in its own frame."""
    color = np.broadcast_to(np.asarray(shape.color, dtype=np.float32), (size, size, 3))
    if not shape.shade and shape.pattern is None:
        return color
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    rel_x, rel_y = (xs - shape.cx) / shape.size, (ys - shape.cy) / shape.size  # in [-0.5, 0.5]
    out = color.copy()
    if shape.pattern is not None:
        w = shape.pattern.weight(rel_x, rel_y)[..., None]
        out = out * (1 - w) + w * np.asarray(shape.pattern.color, dtype=np.float32)
    if shape.shade:
        along = rel_x * math.cos(shape.shade_angle) + rel_y * math.sin(shape.shade_angle)
        out = out * (1 + 2 * shape.shade * along)[..., None]
    return np.clip(out, 0.0, 1.0)


def blur(mask: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of a float image (separable, edges extended)."""
    if sigma <= 0:
        return mask.astype(np.float32)
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    out = mask.astype(np.float32)
    for axis in (0, 1):
        pad = [(r, r) if a == axis else (0, 0) for a in range(2)]
        p = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(k[j] * (p[j : j + n] if axis == 0 else p[:, j : j + n]) for j in range(2 * r + 1))
    return out


def render(scene: Scene) -> Rendered:
    img = background(scene)
    full = [shape_mask(s, scene.size) for s in scene.shapes]
    visible = []
    if scene.shadow:  # cast on the background (objects stay their own colours)
        dx, dy, spread, darkness = scene.shadow
        for s in scene.shapes:
            moved = s.moved(dx * scene.size, dy * scene.size)
            cast = blur(shape_mask(moved, scene.size), spread * scene.size)
            img = img * (1 - darkness * cast)[..., None]
    for i, (s, m) in enumerate(zip(scene.shapes, full)):
        img[m] = shape_colors(s, scene.size)[m]
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
    textured: bool = False,
    overlap: bool = False,
) -> Scene:
    """A random scene whose shapes keep clear of the background's colours and of each other
    (`overlap`: later shapes may cover part of earlier ones). `textured`: a pattern over the
    background, soft shadows, and shaded or patterned shapes after the first (the first stays
    flat: the benchmark finds its edited object by colour)."""
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
    pattern, shadow = None, ()
    if textured:
        second = _color_far(rng, avoid, 0.3)
        avoid.append(second)
        pattern = random_pattern(rng, tuple(float(c) for c in second), background=True)
        if rng.random() < 0.6:
            shadow = (
                float(rng.uniform(0.01, 0.04)),
                float(rng.uniform(0.01, 0.04)),
                float(rng.uniform(0.01, 0.03)),
                float(rng.uniform(0.2, 0.45)),
            )
    shapes: list[Shape] = []
    n = int(rng.integers(n_shapes[0], n_shapes[1] + 1))
    for _ in range(n):
        for _attempt in range(50):
            s = float(rng.uniform(*shape_size))
            margin = s / 2 + 1
            cx, cy = (float(v) for v in rng.uniform(margin, size - margin, 2))
            apart = 4 if overlap else 2  # overlapping: centres half as far apart
            if all(math.hypot(cx - o.cx, cy - o.cy) > (s + o.size) / apart + 2 for o in shapes):
                break
        else:
            continue
        color = _color_far(rng, avoid, 0.45)
        avoid.append(color)
        shape = Shape(str(rng.choice(KINDS)), cx, cy, s, tuple(float(c) for c in color))
        if textured and shapes:
            shape = _dressed(rng, shape)
        shapes.append(shape)
    return Scene(
        size,
        tuple(tuple(float(x) for x in c) for c in corners),
        texture,
        tuple(shapes),
        pattern,
        shadow,
    )


def random_pattern(
    rng: np.random.Generator, color: tuple[float, float, float], background: bool
) -> Pattern:
    """Stripes, checks and dots at several scales and angles, or smooth noise."""
    kind = str(rng.choice(PATTERNS))
    # a background's period is a fraction of the frame (4 to 16 px of 64), a shape's of its size
    period = float(rng.uniform(0.06, 0.25) if background else rng.uniform(0.3, 0.6))
    waves = ()
    if kind == "noise":
        waves = tuple(
            (
                float(rng.uniform(0.5, 1.0)),
                float(rng.uniform(-5, 5)),
                float(rng.uniform(-5, 5)),
                float(rng.uniform(0, 2 * math.pi)),
            )
            for _ in range(4)
        )
    return Pattern(
        kind,
        color,
        period,
        float(rng.uniform(0, math.pi)),
        float(rng.uniform(0.35, 0.8) if background else rng.uniform(0.4, 0.9)),
        waves,
    )


def _dressed(rng: np.random.Generator, shape: Shape) -> Shape:
    """A shape shaded, patterned, both or neither."""
    r = rng.random()
    shade = float(rng.uniform(0.15, 0.35)) if r < 0.5 or r > 0.85 else 0.0
    pattern = None
    if 0.5 <= r:
        second = tuple(float(c) for c in rng.uniform(0, 1, 3))
        pattern = random_pattern(rng, second, background=False)
    return replace(
        shape, shade=shade, shade_angle=float(rng.uniform(0, 2 * math.pi)), pattern=pattern
    )


def batch(
    rng: np.random.Generator,
    n: int,
    size: int = 64,
    flat_share: float = 0.0,
    textured_share: float = 0.0,
) -> np.ndarray:
    """n random images as an n×3×size×size float32 array in [-1, 1] (the training data).

    flat_share: the expected share of scenes on a flat background (the others get gradients);
    textured_share: of the rest, the share from the textured world (overlapping shapes too).
    """
    out = np.empty((n, 3, size, size), dtype=np.float32)
    k = size / 64  # shapes keep their share of the frame at any size
    flat = rng.random(n) < flat_share if flat_share else np.zeros(n, dtype=bool)
    textured = np.zeros(n, dtype=bool)
    if textured_share:  # no draw otherwise: the flat stream stays the committed weights' own
        textured = (rng.random(n) < textured_share) & ~flat
    for i in range(n):
        scene = random_scene(
            rng,
            size,
            shape_size=(10.0 * k, 24.0 * k),
            flat_background=flat[i],
            textured=bool(textured[i]),
            overlap=bool(textured[i]),
        )
        out[i] = render(scene).image.transpose(2, 0, 1) * 2.0 - 1.0
    return out
