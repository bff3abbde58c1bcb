"""Atomic file writes: a dot-prefixed temporary in the target folder, fsync, rename.

A run killed at any moment (SIGKILL included) leaves either the old file or the complete new one
under the final name, never a partial file. Temporaries carry the writer's pid, so the next run can
tell a dead writer's leftovers from a live one's work in progress and remove only the former.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_TMP = re.compile(r"^\..+\.(\d+)\.tmp$")
_cleaned: set[Path] = set()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> int:
    """Remove temporaries whose writer process no longer exists; returns how many."""
    n = 0
    if not folder.is_dir():
        return 0
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if m and not _alive(int(m.group(1))):
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
    return n


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()
    if folder not in _cleaned:  # once per folder and process: leftovers of killed runs go
        remove_stale_temporaries(folder)
        _cleaned.add(folder)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
