"""Where results go, and which files an edit may write: `edit` and `validate` share these checks."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from dragonctl.spec import LoadedSpec

OUTPUT_SUFFIX = ".png"


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


def resolved(p: Path) -> Path:
    """The absolute path with links followed; as written (made absolute) when the system cannot
    follow it (a NUL byte in it, a loop)."""
    try:
        return p.resolve()
    except (OSError, ValueError, RuntimeError):
        return p.absolute()


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
    return {resolved(p) for p in paths}


def sidecar_path(out: Path) -> Path:
    return out.with_suffix(".json")


def output_problems(ls: LoadedSpec, out: Path, metadata: bool = True) -> list[str]:
    """Why `out` cannot be written for this spec (empty when it can), before anything runs:
    not a PNG, one of the spec's inputs, not a regular file, under a file, an unwritable folder."""
    if "\0" in str(out):
        return ["a path cannot hold a NUL byte"]
    if out.suffix.lower() != OUTPUT_SUFFIX:
        return [f"{out}: outputs are PNG files and end in {OUTPUT_SUFFIX}"]
    targets = [out, sidecar_path(out)] if metadata else [out]
    inputs = protected_paths(ls)
    problems = []
    for target in targets:
        if resolved(target) in inputs:
            problems.append(f"{target} is one of the spec's inputs; refusing to overwrite it")
        elif _exists(target) and not _is_regular(target):
            problems.append(f"{target} exists and is not a regular file")
    folder = _first_existing(out.parent)
    if folder is not None and not folder.is_dir():
        problems.append(f"{out}: {folder} is a file, not a folder")
    elif folder is not None and not os.access(folder, os.W_OK | os.X_OK):
        problems.append(f"{out}: cannot write in {folder}")
    return problems


def clobbered(out: Path, metadata: bool = True) -> list[Path]:
    """Existing files the output would replace that dragonctl did not write."""
    from dragonctl.outputs import written_by_dragonctl

    targets = [out, sidecar_path(out)] if metadata else [out]
    return [t for t in targets if _exists(t) and not written_by_dragonctl(t)]


def _exists(p: Path) -> bool:
    return os.path.lexists(p)


def _is_regular(p: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(p).st_mode)
    except OSError:
        return False


def _first_existing(folder: Path) -> Path | None:
    for p in (folder, *folder.parents):
        if _exists(p):
            return p
    return None
