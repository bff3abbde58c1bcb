"""Model families: which defaults in `configs/` a model gets, told from the model itself.

`shapes` is the embedded model, or a folder of one exported by `python -m dragonctl.shapes.train`
(it holds a null prompt); `shapes-v2` is such a folder with its own VAE (built like SD, 128 px).
Stable Diffusion is told apart by structure, never by name: SDXL's UNet takes `text_time` added
conditions (and its pipeline class says so); SD 2.x's UNet uses linear projections in its
transformers and its OpenCLIP text encoder plain GELU; the rest is SD 1.x. A folder is read from
its configs, a single checkpoint from its keys (diffusers' own inference), a hub id from its copy
in the local hub cache.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

SHAPES_MODEL = "shapes"
SD15_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
FAMILIES = ("shapes", "shapes-v2", "sd15", "sd2", "sdxl")
CONFIG_FILES = ("model_index.json", "unet/config.json", "text_encoder/config.json")


def is_shapes_folder(path: Path) -> bool:
    """A shapes-model folder (the package's, or one exported by the trainer)."""
    try:
        return path.is_dir() and (path / "null_prompt.safetensors").is_file()
    except (OSError, ValueError):
        return False


def has_own_vae(path: Path) -> bool:
    """A shapes folder built like SD: a `vae/` beside its UNet."""
    return (path / "vae" / "config.json").is_file()


def family_for_model(model: str) -> str:
    """The family whose `configs/` defaults a model gets."""
    path = Path(model).expanduser()
    if model == SHAPES_MODEL:
        return "shapes"
    if is_shapes_folder(path):
        return "shapes-v2" if has_own_vae(path) else "shapes"
    try:
        if path.is_dir():
            return family_of_configs(_read_configs(lambda name: path / name))
        if path.is_file():
            return _family_of_checkpoint(str(path.resolve()))
    except (OSError, ValueError):
        return "sd15"
    return _family_of_hub_id(model)


def family_of_configs(configs: dict[str, dict]) -> str:
    """The family from a diffusers folder's configs (missing ones are empty)."""
    pipeline = configs.get("model_index.json", {}).get("_class_name", "")
    unet = configs.get("unet/config.json", {})
    text = configs.get("text_encoder/config.json", {})
    if "XL" in pipeline or unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet.get("use_linear_projection") or text.get("hidden_act") == "gelu":
        return "sd2"
    return "sd15"


def _read_configs(locate) -> dict[str, dict]:
    out = {}
    for name in CONFIG_FILES:
        p = locate(name)
        if p is not None and Path(p).is_file():
            out[name] = json.loads(Path(p).read_text())
    return out


@cache
def _family_of_checkpoint(path: str) -> str:
    """A single `.safetensors` checkpoint's family, from its tensor names."""
    if not path.endswith(".safetensors"):
        return "sd15"  # a pickle is not opened to look (it loads only with --allow-pickle)
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            # diffusers' own inference reads names and a few shapes: no tensor is loaded
            kind = infer_diffusers_model_type(_ShapeProbe(f))
    except Exception:  # not a readable checkpoint: the loader says why, with the file's name
        return "sd15"
    if kind.startswith(("xl", "playground")):
        return "sdxl"
    if kind.startswith(("v2", "inpainting_v2")):
        return "sd2"
    return "sd15"


class _ShapeProbe(dict):
    """A checkpoint as diffusers' inference sees it: its names, and each value's shape."""

    def __init__(self, handle) -> None:
        super().__init__((k, None) for k in handle.keys())
        self._handle = handle

    def __getitem__(self, key):
        return _Shaped(tuple(self._handle.get_slice(key).get_shape()))


class _Shaped:
    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


def _family_of_hub_id(repo_id: str) -> str:
    """A hub id's family from its configs in the local hub cache (no network: a model not
    downloaded yet is taken for SD 1.x here, and its specs are merged again over the right
    family's defaults once it has loaded)."""
    from huggingface_hub import try_to_load_from_cache

    def locate(name: str):
        found = try_to_load_from_cache(repo_id, name)
        return found if isinstance(found, str) else None

    try:
        return family_of_configs(_read_configs(locate))
    except (OSError, ValueError):
        return "sd15"
