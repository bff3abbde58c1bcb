"""DragBench: import its samples as drag specs (`dragonctl import dragbench`).

Two layouts are read:
- converted (DirectDrag's): `<category>/<sample>/{original_image.png, mask.png,
  drag_instruction.json}` with `{"prompt": str, "points": [[x, y], ...]}` alternating handle,
  target;
- original (DragDiffusion's): `<category>/<sample>/{original_image.png, meta_data.pkl}` with
  `{prompt, points, mask}`. The pickle is read by an allow-list unpickler that admits numpy arrays
  and plain containers and refuses every other global, so a malicious file runs nothing.

Each sample becomes exactly one spec, `OUT/<category>/<sample>.yaml`, with paths relative to it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from dragonctl.errors import DragonError
from dragonctl.files import atomic_write

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "str"),
    ("builtins", "bytes"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # protocol 2 pickles numpy's bytes through it
}


class SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refused to load {module}.{name}: only numpy arrays and plain containers are allowed"
        )


MAX_ITEMS = 10_000_000  # list and dict items a sample may hold, shared references counted each time


def safe_load_pickle(data: bytes):
    """Only numpy arrays and plain containers; and no more items than MAX_ITEMS once shared
    references are expanded (a few KB of them can stand for billions)."""
    value = SafeUnpickler(io.BytesIO(data)).load()
    _count_items(value, [0], 0)
    return value


def _count_items(value, count: list[int], depth: int) -> None:
    if depth > 64:
        raise pickle.UnpicklingError("nested too deeply")
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple, set)):
        count[0] += len(value)
        if count[0] > MAX_ITEMS:
            raise pickle.UnpicklingError(f"more than {MAX_ITEMS:,} items once expanded")
        for item in value:
            _count_items(item, count, depth + 1)


@dataclass
class Sample:
    category: str
    name: str
    image: Path
    prompt: str
    pairs: list[list[list[float]]]
    mask_path: Path | None = None
    mask_array: np.ndarray | None = None


def _pairs(points, where: Path) -> list[list[list[float]]]:
    pts = [[float(v) for v in p] for p in np.asarray(points, dtype=float).reshape(-1, 2)]
    if len(pts) % 2:
        raise DragonError(
            f"{where}: points: an odd number of points ({len(pts)}); they alternate handle, target"
        )
    return [[pts[i], pts[i + 1]] for i in range(0, len(pts), 2)]


def read_sample(folder: Path) -> Sample:
    category, name = folder.parent.name, folder.name
    image = folder / "original_image.png"
    if not image.exists():
        raise DragonError(f"{folder}: no original_image.png")
    instr = folder / "drag_instruction.json"
    if instr.exists():
        try:
            d = json.loads(instr.read_text())
            return Sample(
                category,
                name,
                image,
                str(d.get("prompt", "")),
                _pairs(d["points"], instr),
                folder / "mask.png",
            )
        except (ValueError, KeyError, TypeError) as e:
            raise DragonError(
                f"{instr}: not a drag instruction ({type(e).__name__}: {e})"
            ) from None
    meta = folder / "meta_data.pkl"
    if meta.exists():
        try:
            d = safe_load_pickle(meta.read_bytes())
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            AttributeError,
            ImportError,
        ) as e:
            raise DragonError(f"{meta}: {e}") from None
        if not isinstance(d, dict) or not {"prompt", "points", "mask"} <= set(d):
            raise DragonError(f"{meta}: expected a dict with prompt, points and mask")
        mask = np.asarray(d["mask"])
        return Sample(
            category, name, image, str(d["prompt"]), _pairs(d["points"], meta), mask_array=mask
        )
    raise DragonError(f"{folder}: neither drag_instruction.json nor meta_data.pkl")


def find_samples(src: Path) -> list[Path]:
    folders = {
        p.parent
        for pattern in ("*/*/drag_instruction.json", "*/*/meta_data.pkl")
        for p in src.glob(pattern)
    }
    return sorted(folders)


def import_dragbench(src: Path, out: Path) -> tuple[list[Path], list[str]]:
    """Write one spec per sample; returns the specs written and one line per sample that failed."""
    written, failed = [], []
    for folder in find_samples(src):
        try:
            s = read_sample(folder)
            spec_path = out / s.category / f"{s.name}.yaml"
            spec_path.parent.mkdir(parents=True, exist_ok=True)
            if s.mask_array is not None:
                mask_file = spec_path.with_suffix(".mask.png")
                buf = io.BytesIO()
                arr = s.mask_array.astype(bool) if s.mask_array.dtype == bool else s.mask_array > 0
                Image.fromarray(arr.astype(np.uint8) * 255).save(buf, format="PNG")
                atomic_write(mask_file, buf.getvalue())
                mask_rel = mask_file.name
            else:
                assert s.mask_path is not None
                mask_rel = os.path.relpath(s.mask_path.resolve(), spec_path.parent.resolve())
            spec = {
                "version": 1,
                "image": os.path.relpath(s.image.resolve(), spec_path.parent.resolve()),
                "mode": "drag",
                "prompt": s.prompt,
                "mask": mask_rel,
                "points": s.pairs,
            }
            text = f"# DragBench {s.category}/{s.name}\n" + yaml.safe_dump(
                spec, sort_keys=False, default_flow_style=None
            )
            atomic_write(spec_path, text.encode())
            written.append(spec_path)
        except DragonError as e:
            failed.append(str(e))
        except (ValueError, TypeError, KeyError, IndexError, OSError) as e:  # malformed data
            failed.append(f"{folder}: not a DragBench sample ({type(e).__name__}: {e})"[:300])
    return written, failed
