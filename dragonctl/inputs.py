"""Decode and check everything a spec points at: images, masks, points, offsets.

`load_inputs` fully decodes every file (a truncated PNG fails here, not mid-edit) and checks the
geometry against the real image sizes. It never loads a model, so `dragonctl validate` is cheap.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dragonctl import geometry
from dragonctl.errors import SpecError
from dragonctl.files import read_regular
from dragonctl.spec import LoadedSpec, MaskSpec

MAX_PIXELS = 8192 * 8192  # decompression-bomb limit: larger images are refused before decoding
MAX_FILE_BYTES = 512 << 20  # an image or mask file larger than this is refused unread


@dataclass
class EditInputs:
    """A spec's decoded inputs, all in source-image pixels."""

    source: np.ndarray  # H×W×3 uint8
    source_bytes: bytes  # the file's bytes: the cache key hashes them
    mask: np.ndarray | None = None  # object (move/resize/appearance) or editable region (drag)
    fill_region: np.ndarray | None = None
    points: list[tuple[tuple[float, float], tuple[float, float]]] = field(default_factory=list)
    reference: np.ndarray | None = None
    reference_mask: np.ndarray | None = None
    target_mask: np.ndarray | None = (
        None  # where the object ends up (move/resize/paste), source pixels
    )
    # the image prompt's adapter and image encoder: a local path made absolute, or a hub location
    image_prompt: tuple[str, str | None] | None = None
    warnings: list[str] = field(default_factory=list)


def read_file(path: Path) -> bytes:
    """An input file's bytes (regular files only, up to MAX_FILE_BYTES)."""
    return read_regular(path, MAX_FILE_BYTES)


# How inputs are read: from the filesystem, or (on a remote worker) from the bytes shipped with a
# spec, by resolved path.
Reader = Callable[[Path], bytes]


def read_image(
    path: Path, spec_file: Path, fld: str, read: Reader = read_file
) -> tuple[np.ndarray, bytes]:
    try:
        data = read(path)
    except FileNotFoundError:
        raise SpecError.one(spec_file, fld, f"file not found: {path}") from None
    except IsADirectoryError:
        raise SpecError.one(spec_file, fld, f"is a directory, not an image: {path}") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        why = getattr(e, "strerror", None) or e
        raise SpecError.one(spec_file, fld, f"cannot read {path}: {why}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise SpecError.one(
                        spec_file,
                        fld,
                        f"image is {w}×{h}, over the {MAX_PIXELS:,}-pixel limit: {path}",
                    )
                img.load()
                arr = to_rgb(ImageOps.exif_transpose(img))  # as cameras mean it, like load_image
    except SpecError:
        raise
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        reason = (
            "not an image Pillow can decode" if isinstance(e, UnidentifiedImageError) else str(e)
        )
        raise SpecError.one(spec_file, fld, f"{reason}: {path}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise SpecError.one(spec_file, fld, f"cannot decode image {path}: {e}") from None
    if arr.shape[0] < 8 or arr.shape[1] < 8:
        raise SpecError.one(
            spec_file,
            fld,
            f"image is {arr.shape[1]}×{arr.shape[0]}; at least 8×8 is needed: {path}",
        )
    return arr, data


def to_rgb(img: Image.Image) -> np.ndarray:
    """H×W×3 uint8. 16- and 32-bit greyscale keep their range (Pillow's RGB conversion clips
    them to white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        grey = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def build_mask(
    ls: LoadedSpec, m: MaskSpec, fld: str, height: int, width: int, read: Reader = read_file
) -> np.ndarray:
    f = ls.path
    if m.path is not None:
        arr, _ = read_image(ls.resolve(m.path), f, fld, read)
        if arr.shape[:2] != (height, width):
            raise SpecError.one(
                f, fld, f"mask is {arr.shape[1]}×{arr.shape[0]} but its image is {width}×{height}"
            )
        mask = arr.max(axis=2) > 127
    elif m.box is not None:
        x0, y0, x1, y1 = m.box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise SpecError.one(
                f, f"{fld}.box", f"box {m.box} is outside the {width}×{height} frame"
            )
        mask = geometry.box_mask(m.box, height, width)
    elif m.polygon is not None:
        if not all(0 <= x <= width and 0 <= y <= height for x, y in m.polygon):
            raise SpecError.one(
                f, f"{fld}.polygon", f"a vertex is outside the {width}×{height} frame"
            )
        mask = geometry.polygon_mask(m.polygon, height, width)
    else:
        cx, cy, r = m.circle  # type: ignore[misc]
        if not (cx - r >= 0 and cy - r >= 0 and cx + r <= width and cy + r <= height):
            raise SpecError.one(
                f, f"{fld}.circle", f"circle {m.circle} reaches outside the {width}×{height} frame"
            )
        mask = geometry.circle_mask(m.circle, height, width)  # type: ignore[arg-type]
    mask = geometry.dilate(mask, m.dilate)
    if not mask.any():
        raise SpecError.one(f, fld, "mask is empty (no white pixels)")
    return mask


def _inside(x: float, y: float, width: int, height: int) -> bool:
    return 0 <= x < width and 0 <= y < height


def input_files(ls: LoadedSpec) -> dict[str, Path]:
    """Every file the spec reads, by field, resolved."""
    s = ls.spec
    files = {"image": s.image}
    for name, m in (("mask", s.mask), ("fill_region", s.fill_region)):
        if m is not None and m.path:
            files[name] = m.path
    if s.reference is not None:
        files["reference.image"] = s.reference.image
        if s.reference.mask.path:
            files["reference.mask"] = s.reference.mask.path
    return {k: ls.resolve(v) for k, v in files.items()}


def load_inputs(ls: LoadedSpec, read: Reader = read_file) -> EditInputs:
    """Decode and check all inputs of a spec; a SpecError names the field of the first problem.

    Args:
        read: reads a file's bytes by resolved path (default: from the filesystem).
    """
    s, f = ls.spec, ls.path
    source, data = read_image(ls.resolve(s.image), f, "image", read)
    h, w = source.shape[:2]
    inp = EditInputs(source=source, source_bytes=data)
    if s.mask is not None:
        inp.mask = build_mask(ls, s.mask, "mask", h, w, read)
        if s.mode != "drag" and inp.mask.all():
            raise SpecError.one(f, "mask", "mask covers the whole image; it must mark an object")
    if s.fill_region is not None:
        inp.fill_region = build_mask(ls, s.fill_region, "fill_region", h, w, read)

    if s.mode in ("move", "resize"):
        assert inp.mask is not None
        dx, dy = s.offset or (0.0, 0.0)
        c = geometry.bbox_center(inp.mask)
        target = geometry.warp_mask(inp.mask, s.effective_scale, c, (c[0] + dx, c[1] + dy), (h, w))
        if not target.any():
            raise SpecError.one(
                f, "offset" if s.offset else "scale", "moves the object fully outside the frame"
            )
        if target.sum() < 0.5 * inp.mask.sum() * s.effective_scale**2:
            inp.warnings.append("more than half of the moved object falls outside the frame")
        inp.target_mask = target

    if s.mode == "drag":
        if inp.mask is None:
            inp.mask = np.ones((h, w), dtype=bool)
        for k, (handle, target) in enumerate(s.points or []):
            for j, (x, y) in enumerate((handle, target)):
                if not _inside(x, y, w, h):
                    raise SpecError.one(
                        f, f"points[{k}][{j}]", f"point ({x}, {y}) is outside the {w}×{h} image"
                    )
                if not inp.mask[int(y), int(x)]:
                    which = "handle" if j == 0 else "target"
                    raise SpecError.one(
                        f,
                        f"points[{k}][{j}]",
                        f"the {which} ({x}, {y}) is outside the editable region (mask)",
                    )
            if handle == target:
                inp.warnings.append(f"points[{k}] has zero length; it will not move anything")
            inp.points.append(((handle[0], handle[1]), (target[0], target[1])))

    if s.reference is not None:
        ref, _ = read_image(ls.resolve(s.reference.image), f, "reference.image", read)
        inp.reference = ref
        inp.reference_mask = build_mask(
            ls, s.reference.mask, "reference.mask", *ref.shape[:2], read=read
        )

    if s.mode == "paste":
        assert inp.reference_mask is not None and s.at is not None
        x, y = s.at
        if not _inside(x, y, w, h):
            raise SpecError.one(f, "at", f"({x}, {y}) is outside the {w}×{h} source image")
        inp.target_mask = paste_target(inp.reference_mask, s.effective_scale, (x, y), (h, w))
        if not inp.target_mask.any():
            raise SpecError.one(f, "scale", "the pasted object is too small to cover any pixel")
    inp.image_prompt = image_prompt_locations(ls)
    return inp


def image_prompt_locations(ls: LoadedSpec) -> tuple[str, str | None] | None:
    """The image prompt's adapter and encoder, located (None when it is off)."""
    ip = ls.spec.guidance.image_prompt
    if ip is None or ip.adapter is None:
        return None
    where = "guidance.image_prompt"
    encoder = None if ip.encoder is None else model_location(ls, ip.encoder, f"{where}.encoder")
    return model_location(ls, ip.adapter, f"{where}.adapter", 3), encoder


def model_location(ls: LoadedSpec, value: str, fld: str, hub_parts: int = 2) -> str:
    """A model file or folder named in a spec: a path relative to the spec file that exists (made
    absolute), else a hub location (`owner/name`, then a path inside the repository; at least
    `hub_parts` parts)."""
    local = ls.resolve(value)
    if local.exists():
        return str(local.resolve())
    parts = value.split("/")
    if value.startswith((".", "/", "~", "\\")) or "" in parts or len(parts) < 2:
        raise SpecError.one(ls.path, fld, f"no such file or folder: {local}")
    if len(parts) < hub_parts:
        raise SpecError.one(
            ls.path,
            fld,
            f"no such file or folder ({local}); on the hub, name the weights file inside the "
            "repository, e.g. h94/IP-Adapter/models/ip-adapter-plus_sd15.safetensors",
        )
    return value


def paste_target(
    ref_mask: np.ndarray, scale: float, at: tuple[float, float], shape: tuple[int, int]
) -> np.ndarray:
    return geometry.warp_mask(ref_mask, scale, geometry.bbox_center(ref_mask), at, shape)
