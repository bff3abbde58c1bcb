"""Where results go, and which files an edit must never overwrite."""

from __future__ import annotations

import os
from pathlib import Path

from dragonctl.spec import LoadedSpec


def output_path(ls: LoadedSpec, out_dir: Path | None, common_root: Path | None) -> Path:
    """`--out DIR` mirrors the spec's path under the specs' common folder; else `output:`; else
    `<spec>.edited.png` beside the spec."""
    if out_dir is not None:
        root = common_root or ls.path.parent
        rel = ls.path.resolve().relative_to(root.resolve()) if common_root else Path(ls.path.name)
        return out_dir / rel.with_suffix(".png")
    if ls.spec.output:
        return ls.resolve(ls.spec.output)
    return ls.path.with_name(ls.path.stem + ".edited.png")


def common_folder(paths: list[Path]) -> Path:
    resolved = [p.resolve().parent for p in paths]
    return Path(os.path.commonpath([str(p) for p in resolved])) if resolved else Path(".")


def protected_paths(ls: LoadedSpec) -> set[Path]:
    """Files an edit must never overwrite: its inputs and its own spec."""
    s = ls.spec
    paths = {ls.path, ls.resolve(s.image)}
    for m in (s.mask, s.fill_region):
        if m is not None and m.path:
            paths.add(ls.resolve(m.path))
    if s.reference is not None:
        paths.add(ls.resolve(s.reference.image))
        if s.reference.mask.path:
            paths.add(ls.resolve(s.reference.mask.path))
    return {p.resolve() for p in paths}
