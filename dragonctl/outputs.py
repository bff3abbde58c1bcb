"""Writing results: the PNG (with A1111-style `parameters` and a `dragonctl` JSON chunk) and the
sidecar JSON. Every file is written to a dot-prefixed temporary in its folder and renamed."""

from __future__ import annotations

import io
import json
import platform
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dragonctl.files import atomic_write, written_together
from dragonctl.spec import Spec


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("dragonctl", "torch", "diffusers", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def parameters_text(
    spec: Spec, model_name: str, size: tuple[int, int] | None = None, model_hash: str = ""
) -> str:
    """The A1111-style `parameters` chunk: prompt on the first line, settings after it, with the
    image's `Size` and the `Model hash` AUTOMATIC1111, ComfyUI and civitai readers look for."""
    g = spec.guidance
    extra = f"Size: {size[0]}x{size[1]}, " if size else ""
    extra += f"Model hash: {model_hash}, " if model_hash else ""
    return (
        f"{spec.prompt}\nSteps: {spec.steps}, Sampler: DDIM, CFG scale: {g.cfg_scale}, "
        f"Seed: {spec.seed}, {extra}Mode: {spec.mode}, Method: {g.method}, "
        f"Energy scale: {g.energy_scale}, Model: {model_name}"
    )


SOFTWARE = "dragonctl"  # every PNG and sidecar says it: the files a later run may replace


def metadata_record(
    spec: Spec, spec_path: Path, identity: dict, timings: dict, extra: dict | None = None
) -> dict:
    return {
        "written_by": SOFTWARE,
        "spec_file": str(spec_path),
        "spec": spec.model_dump(mode="json", by_alias=True),
        "model": identity,
        "versions": package_versions(),
        "timings": {k: round(v, 4) for k, v in timings.items()},
        **(extra or {}),
    }


def png_bytes(
    image: np.ndarray, parameters: str | None = None, record: dict | None = None
) -> bytes:
    info = PngInfo()
    info.add_text("Software", SOFTWARE)
    if parameters is not None:
        info.add_text("parameters", parameters)
    if record is not None:
        info.add_itxt("dragonctl", json.dumps(record, sort_keys=True))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_result(
    path: Path,
    image: np.ndarray,
    spec: Spec | None = None,
    record: dict | None = None,
    model_name: str = "",
    model_hash: str = "",
) -> list[Path]:
    """Write the image (and, with metadata, its sidecar `.json`); returns the paths written."""
    if record is None or spec is None:
        atomic_write(path, png_bytes(image))
        return [path]
    size = (image.shape[1], image.shape[0])
    text = parameters_text(spec, model_name, size, model_hash)
    png = png_bytes(image, text, record)
    sidecar = path.with_suffix(".json")
    with written_together():
        atomic_write(path, png)
        atomic_write(sidecar, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return [path, sidecar]


def read_record(path: Path) -> dict | None:
    """The `dragonctl` metadata of an output (None when it has none, or none that parses)."""
    try:
        with Image.open(path) as img:
            text = img.text.get("dragonctl")  # type: ignore[attr-defined]
        record = json.loads(text) if text else None
    except (OSError, ValueError, SyntaxError):
        return None
    return record if isinstance(record, dict) else None


def written_by_dragonctl(path: Path) -> bool:
    """Whether an existing file is one dragonctl wrote (a PNG or sidecar that says so)."""
    try:
        if not path.is_file() or path.stat().st_size > 512 << 20:
            return False
        if path.suffix == ".json":
            record = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(record, dict) and (
                record.get("written_by") == SOFTWARE
                or {"spec_file", "spec", "model"} <= set(record)
            )
        with Image.open(path) as img:
            text = getattr(img, "text", {})
            return text.get("Software") == SOFTWARE or "dragonctl" in text
    except (OSError, ValueError, SyntaxError):
        return False
