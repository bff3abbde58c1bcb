"""The Python API the CLI wraps and tests and notebooks call: validate, edit, invert, preview, init.

Nothing here parses arguments or prints; results come back as records, failures as `DragonError`s.
The jobs it runs on live beside it: `batch` (finding, checking and ordering specs), `paths`
(outputs), `preview` (drawing), `starters` (init).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from dragonctl.batch import Job, assign_to_devices, check_jobs, expand_specs, run_order
from dragonctl.errors import DragonError, EditInterrupted, SpecError, UsageError
from dragonctl.inputs import EditInputs, load_inputs
from dragonctl.paths import common_folder, output_path, output_problems, protected_paths
from dragonctl.preview import preview_image, preview_sheet, side_by_side
from dragonctl.progress import Progress
from dragonctl.spec import LoadedSpec, load_spec
from dragonctl.starters import init_spec

__all__ = [
    "EditOptions",
    "Session",
    "SpecReport",
    "edit",
    "edit_one",
    "expand_specs",
    "init_spec",
    "invert",
    "load",
    "load_spec",
    "output_path",
    "preview",
    "preview_image",
    "validate",
]


@dataclass
class SpecReport:
    path: Path
    ok: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: Path | None = None
    seconds: float = 0.0
    skipped: bool = False
    inversions: int = 0
    interrupted: bool = False
    worker: str | None = None  # on Ray: the node and actor that ran it

    def as_json(self) -> dict:
        return {
            "spec": str(self.path),
            "ok": self.ok,
            "errors": self.errors,
            "warnings": self.warnings,
            "output": str(self.output) if self.output else None,
            "seconds": round(self.seconds, 3),
            "skipped": self.skipped,
            "inversions": self.inversions,
            **({"worker": self.worker} if self.worker else {}),
        }


@dataclass
class EditOptions:
    out_dir: Path | None = None
    out_root: Path | None = None  # with out_dir: mirror spec paths relative to this
    model: str | None = None
    device: str = "auto"  # several, comma-separated: one worker process per device
    dtype: str = "auto"
    seed: int | None = None
    cache_dir: Path | None = None
    no_cache: bool = False
    local_files_only: bool = False
    allow_pickle: bool = False
    metadata: bool = True
    save_preview: bool = False
    skip_existing: bool = False
    overwrite: bool = False  # replace existing files that dragonctl did not write
    threads: int | None = None  # torch's CPU threads (None: torch's default)
    compile: str = "off"  # off | on | a torch.compile mode: the step loop's UNet forward
    composite: bool | None = None  # blend the edit into the source (None: each spec's own)
    ray: bool = False  # run the batch on Ray (`dragonctl.cluster`)
    ray_address: str | None = None  # the cluster to join (else RAY_ADDRESS, else a local runtime)
    workers: int | None = None  # at most this many Ray workers
    cpus_per_worker: int | None = None  # CPU cores per Ray worker without GPUs


def load(
    path: Path, model: str | None = None, seed: int | None = None
) -> tuple[LoadedSpec, EditInputs]:
    ls = load_spec(path, model=model, seed=seed)
    return ls, load_inputs(ls)


def validate(
    paths: Iterable[str | Path],
    model: str | None = None,
    out_dir: Path | None = None,
    overwrite: bool = False,
    metadata: bool = True,
) -> list[SpecReport]:
    """Every check `edit` makes before it runs, outputs included, without loading a model.
    Raises UsageError when two specs would write one file or read each other's outputs."""
    jobs = check_jobs(expand_specs(paths), out_dir, None, model, None, metadata)
    reports = []
    for j in jobs:
        errors = list(j.errors)
        if not overwrite:
            errors += [
                f"{j.path}: output: {p} exists and was not written by dragonctl "
                "(edit --overwrite replaces it)"
                for p in j.clobbers
            ]
        reports.append(
            SpecReport(j.path, not errors, errors=errors, warnings=j.warnings, output=j.output)
        )
    return reports


class Session:
    """Loads each model once and keeps one `Editor` per model across a batch."""

    def __init__(self, opts: EditOptions) -> None:
        self.opts = opts
        self._editors: dict[str, object] = {}

    def editor(self, model: str):
        if model not in self._editors:
            from dragonctl.cache import TrajectoryCache
            from dragonctl.compilation import resolve_compile
            from dragonctl.engine import Editor
            from dragonctl.models import load_bundle

            o = self.opts
            if o.threads:
                import torch

                torch.set_num_threads(o.threads)
            bundle = load_bundle(model, o.device, o.dtype, o.local_files_only, o.allow_pickle)
            cache = TrajectoryCache(o.cache_dir, enabled=not o.no_cache)
            compile = resolve_compile(o.compile, bundle.device)
            self._editors[model] = Editor(
                bundle,
                cache,
                compile=compile,
                local_files_only=o.local_files_only,
                allow_pickle=o.allow_pickle,
            )
        return self._editors[model]


def edit(
    paths: Iterable[str | Path],
    opts: EditOptions | None = None,
    progress: Progress | None = None,
    on_report: Callable[[SpecReport], None] | None = None,
    stop: Callable[[], bool] | None = None,
    on_start: Callable[[Path, int, int], None] | None = None,
    on_status: Callable[[int, int, dict[str, str], int], None] | None = None,
) -> list[SpecReport]:
    """Edit every spec; a failing spec is reported and the batch goes on.

    Args:
        paths: spec files, folders and globs.
        opts: output, model, device and cache options.
        progress: called as (phase, done, total) during inversion and editing.
        on_report: called with each spec's report as it finishes.
        stop: polled after every sampler step; when it turns true the current edit is abandoned
            (nothing written) and the remaining specs are reported as not run.
        on_start: called as (spec, i, n) before the i-th of n specs runs (1-based, run order).
        on_status: on Ray (`opts.ray`), called as (done, failed, running, n) while the batch
            runs; running maps each busy worker to its spec's name.

    Returns:
        One report per spec, in the order given. Raises UsageError when two specs would write
        one file (before anything runs).
    """
    opts = opts or EditOptions()
    specs = expand_specs(paths)
    jobs = check_jobs(
        specs, opts.out_dir, opts.out_root, opts.model, opts.seed, opts.metadata, opts.composite
    )
    refuse_clobbering(jobs, opts.overwrite)
    if opts.ray:
        from dragonctl.cluster import edit_on_ray

        return edit_on_ray(jobs, opts, on_report, stop, on_status)
    devices = [d.strip() for d in opts.device.split(",") if d.strip()]
    if len(devices) > 1:
        return _edit_on_devices(jobs, opts, devices, on_report)
    session = Session(opts)
    by_index: dict[int, SpecReport] = {}
    interrupted = False
    for i, k in enumerate(run_order(jobs), 1):
        if on_start:
            on_start(jobs[k].path, i, len(jobs))
        failed = [jobs[d].path for d in jobs[k].after if not by_index[d].ok]
        if failed:
            why = f"{jobs[k].path}: not run: it reads the output of {failed[0]}, which failed"
            rep = SpecReport(jobs[k].path, False, errors=[why], output=jobs[k].output)
        else:
            rep = _run_job(session, jobs[k], opts, progress, stop, interrupted)
        interrupted = interrupted or rep.interrupted
        by_index[k] = rep
        if on_report:
            on_report(rep)
    return [by_index[k] for k in range(len(jobs))]


def refuse_clobbering(jobs: list[Job], overwrite: bool) -> None:
    """Outputs may replace nothing, or files dragonctl wrote; anything else needs --overwrite."""
    lines = [
        f"{j.path}: output: {p} exists and was not written by dragonctl (pass --overwrite "
        "to replace it)"
        for j in jobs
        for p in j.clobbers
    ]
    if lines and not overwrite:
        raise UsageError("\n".join(lines))


def _run_job(
    session: Session,
    job: Job,
    opts: EditOptions,
    progress: Progress | None,
    stop: Callable[[], bool] | None,
    interrupted: bool,
) -> SpecReport:
    if job.errors or job.spec is None or job.output is None:
        return SpecReport(job.path, False, errors=job.errors)
    if interrupted:
        return SpecReport(
            job.path, False, errors=[f"{job.path}: not run (interrupted)"], output=job.output
        )
    try:
        inp = load_inputs(job.spec)  # decoded again: a file changed since the check fails here
    except SpecError as e:
        return SpecReport(job.path, False, errors=[str(x) for x in e.problems])
    return edit_one(session, job.spec, inp, job.output, opts, progress, stop)


def _device_worker(paths: list[str], opts: EditOptions) -> list[SpecReport]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return edit(paths, opts)


def _edit_on_devices(
    jobs: list[Job],
    opts: EditOptions,
    devices: list[str],
    on_report: Callable[[SpecReport], None] | None,
) -> list[SpecReport]:
    """One worker process per device (`batch.assign_to_devices` decides which specs)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    reports = {
        k: SpecReport(j.path, False, errors=j.errors) for k, j in enumerate(jobs) if j.spec is None
    }
    assigned = assign_to_devices(jobs, devices)
    root = opts.out_root or (common_folder([j.path for j in jobs]) if opts.out_dir else None)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(devices), mp_context=ctx) as pool:
        futures = {
            d: pool.submit(
                _device_worker,
                [str(jobs[k].path) for k in idxs],
                replace(opts, device=d, out_root=root),
            )
            for d, idxs in assigned.items()
            if idxs
        }
        for d, fut in futures.items():
            for k, rep in zip(assigned[d], fut.result()):
                reports[k] = rep
    out = [reports[k] for k in range(len(jobs))]
    if on_report:
        for rep in out:
            on_report(rep)
    return out


@dataclass
class Edited:
    """A finished edit before it is written: what a worker hands back to be written."""

    image: np.ndarray  # the source's size, uint8 RGB
    record: dict | None  # the metadata record (None without metadata)
    model_name: str
    model_hash: str
    inversions: int
    warnings: list[str] = field(default_factory=list)


def compute_edit(
    session: Session,
    ls: LoadedSpec,
    inp: EditInputs,
    opts: EditOptions,
    progress: Progress | None = None,
    stop: Callable[[], bool] | None = None,
    digests: dict[str, str] | None = None,
) -> Edited:
    """Run one edit (nothing is written); `digests` are the inputs' hashes when already known.
    Raises what the edit raises (see `failure_message`)."""
    from dragonctl import outputs

    editor = session.editor(ls.spec.model)
    if editor.bundle.family != ls.family:  # a hub model unknown until it was downloaded
        ls = ls.for_family(editor.bundle.family)
    result = editor.edit(ls.spec, inp, progress, stop)
    record = None
    if opts.metadata:
        stats = {
            "unet_forward": result.stats.unet_forward,
            "unet_backward": result.stats.unet_backward,
            "inversions": result.inversions,
            "edited_fraction": round(result.edited_fraction, 6),
            "unet_row_passes": result.stats.unet_row_passes,
        }
        if result.stats.image_prompt_steps:
            stats["image_prompt_steps"] = result.stats.image_prompt_steps
        inputs = digests if digests is not None else input_digests(ls, inp.source_bytes)
        record = outputs.metadata_record(
            ls.spec,
            ls.path,
            editor.bundle.identity,
            result.timings,
            {"inputs": inputs, "stats": stats},
        )
    b = editor.bundle
    warnings = list(editor.cache.warnings)
    editor.cache.warnings.clear()
    return Edited(
        result.image,
        record,
        b.name,
        b.model_hash if opts.metadata else "",
        result.inversions,
        warnings,
    )


def write_edited(
    ls: LoadedSpec, inp: EditInputs | None, out: Path, opts: EditOptions, e: Edited
) -> None:
    """Write an edit's PNG (with its metadata) and sidecar, atomically, and its previews."""
    from dragonctl import outputs

    spec = ls.spec if opts.metadata else None
    outputs.write_result(out, e.image, spec, e.record, e.model_name, e.model_hash)
    if opts.save_preview and inp is not None:
        _write_previews(ls, inp, e.image, out)


def failure_message(path: Path, out: Path | None, e: BaseException) -> str | None:
    """How a failed edit is reported, or None for an exception that is not an edit's failure."""
    if isinstance(e, EditInterrupted):
        return f"{path}: {e}; nothing written"
    if isinstance(e, DragonError):
        return f"{path}: {e}"
    if isinstance(e, (RuntimeError, ValueError)):  # torch's own failures (e.g. out of memory)
        first = str(e).splitlines()[0] if str(e) else ""
        return f"{path}: edit failed: {type(e).__name__}: {first}"
    if isinstance(e, OSError):
        return f"{path}: output: cannot write {out}: {e.strerror or e}"
    return None


def edit_one(
    session: Session,
    ls: LoadedSpec,
    inp: EditInputs,
    out: Path,
    opts: EditOptions,
    progress: Progress | None,
    stop: Callable[[], bool] | None = None,
) -> SpecReport:
    """Edit one loaded spec and write its result (a failure is reported, never raised)."""
    t0 = time.perf_counter()
    rep = SpecReport(ls.path, False, warnings=list(inp.warnings), output=out)
    problems = output_problems(ls, out, opts.metadata)
    if problems:  # a single spec's edit, or a file that changed since the batch's check
        rep.errors += [f"{ls.path}: output: {p}" for p in problems]
        return rep
    if opts.skip_existing and up_to_date(ls, out):
        rep.ok, rep.skipped = True, True
        return rep
    try:
        edited = compute_edit(session, ls, inp, opts, progress, stop)
        write_edited(ls, inp, out, opts, edited)
        rep.ok, rep.inversions = True, edited.inversions
        rep.warnings += edited.warnings
    except Exception as e:
        message = failure_message(ls.path, out, e)
        if message is None:
            raise
        rep.errors.append(message)
        rep.interrupted = isinstance(e, EditInterrupted)
    rep.seconds = time.perf_counter() - t0
    return rep


def input_digests(ls: LoadedSpec, source_bytes: bytes | None = None) -> dict[str, str]:
    """SHA-256 of every file the spec reads, by field: what a result was made from (the
    source's bytes, when already read, are not read again)."""
    import hashlib

    from dragonctl.inputs import input_files, read_file

    def content(field: str, path: Path) -> bytes:
        if field == "image" and source_bytes is not None:
            return source_bytes
        return read_file(path)

    files = input_files(ls)
    return {k: hashlib.sha256(content(k, v)).hexdigest() for k, v in files.items()}


def up_to_date(ls: LoadedSpec, out: Path) -> bool:
    """Whether `out` was made from this spec, these input files and this model's weights (its
    metadata says so); an output without that record is not."""
    from dragonctl import outputs
    from dragonctl.models import weights_fingerprint

    rec = outputs.read_record(out) if out.exists() else None
    if rec is None or rec.get("spec") != ls.spec.model_dump(mode="json", by_alias=True):
        return False
    try:
        same_inputs = rec.get("inputs") == input_digests(ls)
        model = rec.get("model")
        same_model = isinstance(model, dict) and model.get("weights_hash") == weights_fingerprint(
            ls.spec.model
        )
    except (OSError, ValueError):
        return False
    return same_inputs and same_model


def _write_previews(ls: LoadedSpec, inp: EditInputs, result, out: Path) -> None:
    from dragonctl import outputs

    outputs.write_result(out.with_name(out.stem + ".overlay.png"), preview_sheet(ls, inp))
    outputs.write_result(out.with_name(out.stem + ".compare.png"), side_by_side(inp.source, result))


def invert(
    paths: Iterable[str | Path], opts: EditOptions | None = None, progress: Progress | None = None
) -> list[SpecReport]:
    """Fill the cache with each spec's source inversion (and its second image's)."""
    from dragonctl.modes import build_plan
    from dragonctl.schedules import Schedule

    opts = opts or EditOptions()
    session = Session(opts)
    reports = []
    for p in expand_specs(paths):
        t0 = time.perf_counter()
        try:
            ls, inp = load(p, model=opts.model)
            ed = session.editor(ls.spec.model)
            before = ed.inversions
            frame = ed.frame_for(inp.source, ls.spec.resolution)
            schedule = Schedule.from_config(ed.bundle.scheduler_config, ls.spec.steps)
            plan = build_plan(ls.spec, inp, frame, ed.bundle.latent_factor)  # its second image
            ed.memory_bank(
                ls.spec, inp, frame.image_to_work(inp.source), plan.second_image, schedule, progress
            )
            reports.append(
                SpecReport(
                    p, True, seconds=time.perf_counter() - t0, inversions=ed.inversions - before
                )
            )
        except SpecError as e:
            reports.append(SpecReport(p, False, errors=[str(x) for x in e.problems]))
        except DragonError as e:
            reports.append(SpecReport(p, False, errors=[f"{p}: {e}"]))
    return reports


def preview(path: str | Path, out: Path | None = None) -> Path:
    """Write the spec's overlay PNG (default: SPEC.preview.png beside it)."""
    from dragonctl import outputs

    ls, inp = load(Path(path))
    out = out or ls.path.with_name(ls.path.stem + ".preview.png")
    if out.resolve() in protected_paths(ls):
        raise DragonError(f"{ls.path}: preview output {out} is one of the spec's inputs")
    outputs.write_result(out, preview_sheet(ls, inp))
    return out
