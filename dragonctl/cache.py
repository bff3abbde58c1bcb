"""The inversion cache: content-addressed safetensors files, written atomically, checked on read.

Key: `TrajectoryKey`, everything an inverted trajectory depends on. Each entry is one
`.safetensors` file holding the latent trajectory (fp32) and, in its header, the key fields and a
checksum of the tensor bytes, so a truncated or corrupted entry is detected and recomputed. Reads
never unpickle. Entries are evicted least-recently-used above a size cap.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dragonctl.files import atomic_write

FORMAT = 2  # 2: the key gained the scheduler config and the hub revision
DEFAULT_CAP_GB = 4.0  # override with DRAGONCTL_CACHE_MAX_GB


def default_cap() -> int:
    try:
        return int(float(os.environ.get("DRAGONCTL_CACHE_MAX_GB", DEFAULT_CAP_GB)) * 2**30)
    except ValueError:
        return int(DEFAULT_CAP_GB * 2**30)


def default_dir() -> Path:
    env = os.environ.get("DRAGONCTL_CACHE")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "dragonctl"


@dataclass(frozen=True)
class TrajectoryKey:
    """Everything an inverted trajectory depends on: equal keys, interchangeable trajectories.

    Fields:
        image_sha256: SHA-256 of the inverted image's bytes (the source file's, or the second
            bank image's pixels at working size).
        model: the model's identity (`ModelBundle.identity`): name, family, weights hash, hub
            revision and prediction type.
        scheduler_sha256: SHA-256 of the scheduler config (its noise schedule sets every ᾱ).
        work_hw: the working size the image was inverted at.
        steps: DDIM steps.
        prompt: the prompt the inversion conditions on.
        refine: fixed-point refinements per inversion step.
        format: the cache's format version.
    """

    image_sha256: str
    model: dict
    scheduler_sha256: str
    work_hw: tuple[int, int]
    steps: int
    prompt: str
    refine: int = 0
    format: int = FORMAT

    @classmethod
    def of(
        cls,
        image_bytes: bytes,
        identity: dict,
        scheduler_config: dict,
        work_hw: tuple[int, int],
        steps: int,
        prompt: str,
        refine: int = 0,
    ) -> TrajectoryKey:
        sched = json.dumps(scheduler_config, sort_keys=True, default=str).encode()
        return cls(
            hashlib.sha256(image_bytes).hexdigest(),
            dict(identity),
            hashlib.sha256(sched).hexdigest(),
            (int(work_hw[0]), int(work_hw[1])),
            steps,
            prompt,
            refine,
        )

    def as_dict(self) -> dict:
        d = asdict(self)
        d["work_hw"] = list(self.work_hw)
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0


class TrajectoryCache:
    def __init__(
        self, root: Path | None = None, cap_bytes: int | None = None, enabled: bool = True
    ) -> None:
        self.root = (root or default_dir()).expanduser()
        self.cap_bytes = default_cap() if cap_bytes is None else cap_bytes
        self.enabled = enabled
        self.stats = CacheStats()
        self.warnings: list[str] = []

    def _path(self, key: TrajectoryKey) -> Path:
        return self.root / "trajectories" / f"{key.digest()[:32]}.safetensors"

    def get(self, key: TrajectoryKey) -> torch.Tensor | None:
        if not self.enabled:
            return None
        path = self._path(key)
        if not path.exists():
            self.stats.misses += 1
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                latents = fh.get_tensor("latents")
            ok = (
                json.loads(meta.get("key", "null")) == key.as_dict()
                and meta.get("sha256")
                == hashlib.sha256(latents.contiguous().numpy().tobytes()).hexdigest()
            )
        except Exception:  # safetensors raises several types on a damaged header or body
            ok = False
        if not ok:
            self.stats.corrupt += 1
            self.warnings.append(f"cache entry {path.name} was damaged; recomputing it")
            self._forget(path)
            return None
        self.stats.hits += 1
        try:
            os.utime(path)  # recency for LRU eviction
        except OSError:
            pass  # a read-only cache still serves its entries
        return latents

    def put(self, key: TrajectoryKey, latents: torch.Tensor) -> None:
        if not self.enabled:
            return
        from safetensors.torch import save

        latents = latents.detach().to("cpu", torch.float32).contiguous()
        meta = {
            "key": json.dumps(key.as_dict(), sort_keys=True),
            "sha256": hashlib.sha256(latents.numpy().tobytes()).hexdigest(),
        }
        path = self._path(key)
        try:
            atomic_write(path, save({"latents": latents}, metadata=meta))
            self.evict()
        except OSError as e:  # the cache's fault, not the edit's: go on without it
            self.enabled = False
            self.warnings.append(
                f"cache {self.root} cannot be written ({e.strerror or e}); editing without it"
            )

    def _forget(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError:  # e.g. a directory where the entry should be
            self.enabled = False
            self.warnings.append(f"cache entry {path} cannot be removed; editing without the cache")

    def entries(self) -> list[Path]:
        folder = self.root / "trajectories"
        return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.entries())

    def evict(self) -> list[Path]:
        entries = sorted(self.entries(), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        removed = []
        while entries and total > self.cap_bytes:
            p = entries.pop(0)
            total -= p.stat().st_size
            p.unlink(missing_ok=True)
            removed.append(p)
        return removed

    def clear(self, older_than_s: float | None = None) -> int:
        now = time.time()
        n = 0
        for p in self.entries():
            if older_than_s is None or now - p.stat().st_mtime > older_than_s:
                p.unlink(missing_ok=True)
                n += 1
        return n
