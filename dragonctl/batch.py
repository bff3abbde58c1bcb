"""A batch of specs: finding them, checking them up front, and the order they run in.

Specs are checked before any model loads (inputs fully decoded, outputs distinct), then run
grouped by model and source, so each source is inverted once; across devices, whole source groups
go to one device, largest first. Execution lives in `dragonctl.api`.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dragonctl.errors import SpecError, UsageError
from dragonctl.inputs import load_inputs
from dragonctl.paths import common_folder, output_path
from dragonctl.spec import LoadedSpec, load_spec

SPEC_SUFFIX = ".yaml"


def expand_specs(items: Iterable[str | Path]) -> list[Path]:
    """Spec files from paths, folders (searched recursively for *.yaml) and globs, in order, once
    each."""
    out: list[Path] = []
    seen: set[Path] = set()
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.rglob(f"*{SPEC_SUFFIX}"))
        elif any(ch in str(item) for ch in "*?["):
            found = sorted(Path(x) for x in glob.glob(str(item), recursive=True))
        else:
            found = [p]
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                out.append(f)
    return out


@dataclass
class Job:
    """One spec of a batch: loaded and given its output, or the problems that stop it."""

    path: Path
    spec: LoadedSpec | None = None
    output: Path | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def source_group(self) -> tuple[str, str]:
        """Specs with the same model and source image share one inversion."""
        if self.spec is None:
            return ("", "")
        ls = self.spec
        return ls.spec.model, str(ls.resolve(ls.spec.image).resolve())


def check_jobs(
    paths: list[Path],
    out_dir: Path | None,
    out_root: Path | None,
    model: str | None = None,
    seed: int | None = None,
) -> list[Job]:
    """Load and check every spec (inputs decoded, then dropped: a batch of thousands stays
    small). Raises UsageError when two specs would write one file."""
    root = (out_root or common_folder(paths)) if out_dir is not None else None
    jobs = []
    for p in paths:
        try:
            ls = load_spec(p, model=model, seed=seed)
            load_inputs(ls)
            jobs.append(Job(p, ls, output_path(ls, out_dir, root)))
        except SpecError as e:
            jobs.append(Job(p, errors=[str(x) for x in e.problems]))
    seen: dict[Path, Path] = {}
    for job in jobs:
        if job.output is None:
            continue
        key = job.output.resolve()
        if key in seen:
            raise UsageError(
                f"{job.path}: output {job.output} is also the output of {seen[key]}; "
                "give one of them another `output:` or use --out"
            )
        seen[key] = job.path
    return jobs


def run_order(jobs: list[Job]) -> list[int]:
    """Job indices grouped by model and source (stable within a group)."""
    return sorted(range(len(jobs)), key=lambda k: jobs[k].source_group)


def assign_to_devices(jobs: list[Job], devices: list[str]) -> dict[str, list[int]]:
    """Whole source groups to one device each, largest group first, to the least loaded device."""
    groups: dict[tuple[str, str], list[int]] = {}
    for k, job in enumerate(jobs):
        if job.spec is not None:
            groups.setdefault(job.source_group, []).append(k)
    load = {d: 0 for d in devices}
    assigned: dict[str, list[int]] = {d: [] for d in devices}
    for idxs in sorted(groups.values(), key=len, reverse=True):
        d = min(devices, key=lambda x: load[x])
        assigned[d] += idxs
        load[d] += len(idxs)
    return assigned
