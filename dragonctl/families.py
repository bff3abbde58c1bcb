"""Model families: which defaults in `configs/` a model gets, told from the model itself.

`shapes` is the embedded model, or a folder of one exported by `python -m dragonctl.shapes.train`
(it holds a null prompt); anything else is Stable Diffusion 1.x (`sd15`).
"""

from __future__ import annotations

from pathlib import Path

SHAPES_MODEL = "shapes"
SD15_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
FAMILIES = ("shapes", "sd15")


def is_shapes_folder(path: Path) -> bool:
    """A shapes-model folder (the package's, or one exported by the trainer)."""
    try:
        return path.is_dir() and (path / "null_prompt.safetensors").is_file()
    except (OSError, ValueError):
        return False


def family_for_model(model: str) -> str:
    """The family whose `configs/` defaults a model gets."""
    if model == SHAPES_MODEL or is_shapes_folder(Path(model).expanduser()):
        return "shapes"
    return "sd15"
