"""A batch of specs: finding them, checking them up front, and the order they run in.

Specs are checked before any model loads (inputs fully decoded, outputs distinct), then run
grouped by model and source, so each source is inverted once; across devices, whole source groups
go to one device, largest first. Execution lives in `dragonctl.api`.
"""

from __future__ import annotations

import glob
import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dragonctl.errors import SpecError, UsageError
from dragonctl.inputs import load_inputs
from dragonctl.paths import (
    clobbered,
    common_folder,
    output_path,
    output_problems,
    protected_paths,
    resolved,
)
from dragonctl.spec import SPEC_SUFFIXES, LoadedSpec, load_spec


def expand_specs(items: Iterable[str | Path]) -> list[Path]:
    """Spec files from paths, folders (searched recursively for *.yaml and *.yml) and globs, in
    order, once each."""
    out: list[Path] = []
    seen: set[Path] = set()
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in SPEC_SUFFIXES and f.is_file())
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
    after: list[int] = field(default_factory=list)  # jobs whose outputs this one reads
    clobbers: list[Path] = field(default_factory=list)  # files it would replace, not dragonctl's
    warnings: list[str] = field(default_factory=list)

    @property
    def source_group(self) -> tuple[str, str]:
        """Specs with the same model and source image share one inversion."""
        if self.spec is None:
            return ("", "")
        ls = self.spec
        return ls.spec.model, str(resolved(ls.resolve(ls.spec.image)))


def check_jobs(
    paths: list[Path],
    out_dir: Path | None,
    out_root: Path | None,
    model: str | None = None,
    seed: int | None = None,
    metadata: bool = True,
    composite: bool | None = None,
    preset: str | None = None,
    overwrite: bool = True,
) -> list[Job]:
    """Load and check every spec and its output, and find which specs read others' outputs.
    Without `overwrite`, an output over a file dragonctl did not write is an error of its spec.

    Inputs are decoded, then dropped (a batch of thousands stays small); an input that an earlier
    spec of the batch produces is checked when that spec has run. Raises UsageError when two
    specs would write one file, or specs read each other's outputs in a cycle.
    """
    root = (out_root or common_folder(paths)) if out_dir is not None else None
    overrides = (model, seed, composite, preset)
    jobs = [_load_job(p, overrides, out_dir, root, metadata) for p in paths]
    for j in [] if overwrite else jobs:
        j.errors += clobber_problems(j, "edit --overwrite replaces it")
    _refuse_shared_outputs(jobs)
    # a spec refused here produces nothing: who reads its output is checked against the file now
    producers = {resolved(j.output): k for k, j in enumerate(jobs) if j.output and not j.errors}
    refused = {resolved(j.output): j.path for j in jobs if j.output and j.errors}
    for k, job in enumerate(jobs):
        if job.spec is None:
            continue
        inputs = protected_paths(job.spec) - {resolved(job.path)}
        job.after = sorted({producers[p] for p in inputs if p in producers} - {k})
        for d in job.after:
            job.warnings.append(f"an input is produced by {jobs[d].path}; checked when it has run")
        if not job.after and not job.errors:
            try:
                job.warnings += load_inputs(job.spec).warnings
            except SpecError as e:
                job.errors = [str(x) for x in e.problems]
                job.errors += [
                    f"{job.path}: reads {p.name}, the output of {refused[p]}, which is invalid"
                    for p in sorted(inputs & refused.keys())
                ]
    run_order(jobs)  # refuses cycles now, before anything runs
    return jobs


def clobber_problems(job: Job, hint: str) -> list[str]:
    """A line per file the job's output would replace that dragonctl did not write."""
    return [
        f"{job.path}: output: {c} exists and was not written by dragonctl ({hint})"
        for c in job.clobbers
    ]


def _load_job(
    p: Path,
    overrides: tuple[str | None, int | None, bool | None, str | None],
    out_dir: Path | None,
    root: Path | None,
    metadata: bool,
) -> Job:
    try:
        ls = load_spec(p, *overrides)
    except SpecError as e:
        return Job(p, errors=[str(x) for x in e.problems])
    out = output_path(ls, out_dir, root)
    job = Job(p, ls, out)
    job.errors = [f"{p}: output: {reason}" for reason in output_problems(ls, out, metadata)]
    if not job.errors:
        job.clobbers = clobbered(out, metadata)
    return job


def _refuse_shared_outputs(jobs: list[Job]) -> None:
    seen: dict[Path, Path] = {}
    for job in jobs:
        if job.output is None:
            continue
        key = resolved(job.output)
        if key in seen:
            raise UsageError(
                f"{job.path}: output {job.output} is also the output of {seen[key]}; "
                "give one of them another `output:` or use --out"
            )
        seen[key] = job.path


def run_order(jobs: list[Job]) -> list[int]:
    """Job indices grouped by model and source, each after the specs whose outputs it reads."""
    rank = {
        k: r for r, k in enumerate(sorted(range(len(jobs)), key=lambda k: jobs[k].source_group))
    }
    waiting = {k: len(set(job.after)) for k, job in enumerate(jobs)}
    readers: dict[int, list[int]] = {}
    for k, job in enumerate(jobs):
        for d in set(job.after):
            readers.setdefault(d, []).append(k)
    ready = [(rank[k], k) for k, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        _, k = heapq.heappop(ready)
        order.append(k)
        for r in readers.get(k, []):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, (rank[r], r))
    if len(order) < len(jobs):
        cycle = sorted(str(jobs[k].path) for k in set(range(len(jobs))) - set(order))
        raise UsageError(f"these specs read each other's outputs in a cycle: {', '.join(cycle)}")
    return order


def chains(jobs: list[Job]) -> list[list[int]]:
    """Jobs linked by the outputs they read, each chain whole, in run order."""
    root = list(range(len(jobs)))

    def find(k: int) -> int:
        while root[k] != k:
            k = root[k]
        return k

    for k, job in enumerate(jobs):
        for d in job.after:
            root[find(k)] = find(d)
    groups: dict[int, list[int]] = {}
    for k in run_order(jobs):
        groups.setdefault(find(k), []).append(k)
    return list(groups.values())


def assign_to_devices(jobs: list[Job], devices: list[str]) -> dict[str, list[int]]:
    """Whole source groups (and chains) to one device each, largest first, to the least loaded."""
    groups: dict[tuple[str, str], list[int]] = {}
    for chain in chains(jobs):
        live = [k for k in chain if jobs[k].spec is not None]
        if live:
            groups.setdefault(jobs[live[0]].source_group, []).extend(live)
    load = {d: 0 for d in devices}
    assigned: dict[str, list[int]] = {d: [] for d in devices}
    for idxs in sorted(groups.values(), key=len, reverse=True):
        d = min(devices, key=lambda x: load[x])
        assigned[d] += idxs
        load[d] += len(idxs)
    return assigned
