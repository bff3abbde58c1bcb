"""The notebook API, in diffusers' spirit: load a model once, edit images in memory.

    import dragonctl
    editor = dragonctl.Editor("shapes")                     # a model id, folder or file
    result = editor.edit(image, {"mode": "move", "mask": {"box": [16, 24, 56, 64]},
                                 "offset": [40, 0]})
    result.image                                           # a PIL image, the source's size

The spec is a dict with the YAML's fields (`version` and `image` optional); the image, masks and
references may be PIL images, numpy arrays or paths. They go through the same checks as a spec
file (written to a temporary folder and read back), so a notebook and `dragonctl edit` agree.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from dragonctl.api import EditOptions, Session
from dragonctl.families import SD15_MODEL


@dataclass
class NotebookResult:
    image: Image.Image  # at the source's size
    metadata: dict = field(default_factory=dict)  # the resolved spec, model, timings, stats
    warnings: list[str] = field(default_factory=list)


class Editor:
    """A model loaded once; `edit` runs one spec on in-memory images.

    Args:
        model: `shapes`, a hub id, a diffusers folder or a `.safetensors` file.
        device: auto, cpu, cuda, cuda:N or mps.
        dtype: auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16 or bf16.
        cache_dir: the inversion cache (None: the user cache; `no_cache=True`: none).
    """

    def __init__(
        self,
        model: str = SD15_MODEL,
        device: str = "auto",
        dtype: str = "auto",
        cache_dir: Path | None = None,
        no_cache: bool = False,
        local_files_only: bool = False,
    ) -> None:
        self.opts = EditOptions(
            model=model,
            device=device,
            dtype=dtype,
            cache_dir=cache_dir,
            no_cache=no_cache,
            local_files_only=local_files_only,
        )
        self.session = Session(self.opts)
        self.engine = self.session.editor(model)  # loads now, once

    @property
    def device(self):
        return self.engine.bundle.device

    def to(self, device: str) -> Editor:
        """The same model on another device (loaded again there)."""
        self.opts.device = device
        self.session = Session(self.opts)
        self.engine = self.session.editor(self.opts.model)
        return self

    def edit(
        self,
        image: Any,
        spec: dict,
        generator=None,
        callback: Callable[[int, int], None] | None = None,
    ) -> NotebookResult:
        """Edit `image` as `spec` says.

        Args:
            image: a PIL image, an H×W×3 uint8 array, or a path.
            spec: the YAML's fields as a dict (masks: PIL, bool arrays, paths or inline shapes).
            generator: a torch.Generator whose seed drives the SDE noise (else `spec`'s seed).
            callback: called as (step, steps) after every editing step.
        """
        from dragonctl.inputs import load_inputs
        from dragonctl.spec import load_spec

        seed = generator.initial_seed() if generator is not None else None

        def progress(phase: str, done: int, total: int) -> None:
            if callback and phase == "editing":
                callback(done, total)

        with tempfile.TemporaryDirectory(prefix="dragonctl-") as tmp:
            path = write_spec_folder(image, spec, Path(tmp))
            ls = load_spec(path, model=self.opts.model, seed=seed)
            inp = load_inputs(ls)
            result = self.engine.edit(ls.spec, inp, progress)
        return self._result(ls.spec, inp, result)

    def edit_many(
        self, image: Any, specs: list[dict], max_batch: int | None = None
    ) -> list[NotebookResult]:
        """Several edits of one image: those that share a batch shape (prompt, resolution,
        steps, step windows) run in one sampler loop, up to `max_batch` at a time (None: as
        many as free GPU memory holds; 1 on the CPU). The same results as `edit` one by one.
        Raises the first edit's failure, if any."""
        from dragonctl.inputs import load_inputs
        from dragonctl.spec import load_spec

        limit = max_batch or self.engine.default_max_batch()
        groups: dict = {}
        with tempfile.TemporaryDirectory(prefix="dragonctl-") as tmp:
            loaded = []
            for k, spec in enumerate(specs):
                folder = Path(tmp) / str(k)
                folder.mkdir()
                ls = load_spec(write_spec_folder(image, spec, folder), self.opts.model)
                loaded.append((ls.spec, load_inputs(ls)))
        for k, (spec, inp) in enumerate(loaded):
            key = self.engine.batch_key(spec, inp)
            groups.setdefault(k if key is None else key, []).append(k)
        results: dict[int, NotebookResult] = {}
        for members in groups.values():
            for at in range(0, len(members), limit):
                chunk = members[at : at + limit]
                done = self.engine.edit_batch([loaded[k] for k in chunk])
                for k, result in zip(chunk, done):
                    if isinstance(result, Exception):
                        raise result
                    results[k] = self._result(*loaded[k], result)
        return [results[k] for k in range(len(specs))]

    def _result(self, spec, inp, result) -> NotebookResult:
        from dragonctl import outputs

        record = outputs.metadata_record(
            spec, Path("<notebook>"), self.engine.bundle.identity, result.timings
        )
        return NotebookResult(Image.fromarray(result.image), record, list(inp.warnings))


def write_spec_folder(image: Any, spec: dict, folder: Path) -> Path:
    """`spec.yaml` in `folder`, its in-memory images and masks written beside it as PNGs."""
    data = {"version": 1, **spec}
    data["image"] = _file(image, folder / "image.png", mask=False)
    for key in ("mask", "fill_region"):
        if key in data:
            data[key] = _mask(data[key], folder / f"{key}.png")
    if isinstance(data.get("reference"), dict):
        ref = dict(data["reference"])
        ref["image"] = _file(ref.get("image"), folder / "reference.png", mask=False)
        if "mask" in ref:
            ref["mask"] = _mask(ref["mask"], folder / "reference_mask.png")
        data["reference"] = ref
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(_plain(data), sort_keys=False))
    return path


def _mask(value: Any, where: Path) -> Any:
    return value if isinstance(value, dict) else _file(value, where, mask=True)


def _file(value: Any, where: Path, mask: bool) -> str:
    if isinstance(value, (str, Path)):
        return str(Path(value).expanduser().absolute())
    if isinstance(value, np.ndarray):
        arr = value.astype(np.uint8) * 255 if value.dtype == bool else value
        value = Image.fromarray(arr)
    if isinstance(value, Image.Image):
        value.save(where)
        return str(where)
    what = "mask" if mask else "image"
    raise TypeError(f"{what}: a PIL image, a numpy array or a path, not {type(value).__name__}")


def _plain(value: Any) -> Any:
    """YAML-safe: tuples and numpy values as lists and numbers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
