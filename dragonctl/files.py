"""Atomic file writes: a dot-prefixed temporary in the target folder, fsync, rename.

A run killed at any moment (SIGKILL included) leaves either the old file or the complete new one
under the final name, never a partial file. Temporaries carry the writer's pid, so the next run can
tell a dead writer's leftovers from a live one's work in progress and remove only the former.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
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


_together = {"depth": 0, "pending": False}


def interrupt_now() -> None:
    """Raise KeyboardInterrupt here, or where the files being written together are all written."""
    if _together["depth"]:
        _together["pending"] = True
        return
    raise KeyboardInterrupt


@contextmanager
def written_together() -> Iterator[None]:
    """An `interrupt_now` inside the block takes effect at its end: an image and its sidecar are
    both new or both old."""
    _together["depth"] += 1
    try:
        yield
    finally:
        _together["depth"] -= 1
        if not _together["depth"] and _together["pending"]:
            _together["pending"] = False
            raise KeyboardInterrupt


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


class NotARegularFile(OSError):
    """A FIFO, device or other special file where a regular file is expected."""


def read_regular(path: Path, cap: int) -> bytes:
    """A regular file's bytes, at most `cap` of them: a FIFO would block and a device such as
    /dev/zero would never end, so both are refused before they are opened."""
    st = os.stat(path)  # follows links: a link to /dev/zero is refused too
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(21, "is a directory", str(path))
    if not stat.S_ISREG(st.st_mode):
        raise NotARegularFile(f"not a regular file: {path}")
    if st.st_size > cap:
        raise OSError(f"larger than {cap >> 20} MiB: {path}")
    with open(path, "rb") as fh:  # read(n) allocates n up front: ask for what the file holds
        data = fh.read(st.st_size + 1)
    if len(data) > cap:  # it grew while being read
        raise OSError(f"larger than {cap >> 20} MiB: {path}")
    return data
