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

from dragonctl.batch import (
    Job,
    assign_to_devices,
    check_jobs,
    clobber_problems,
    expand_specs,
    run_order,
)
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
    # at most this many edits of one source share a sampler loop (None: the editor's default,
    # from free accelerator memory; 1 on the CPU)
    max_batch: int | None = None
    preset: str | None = None  # every spec's preset (None: each spec's own)


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
    jobs = check_jobs(
        expand_specs(paths), out_dir, None, model, None, metadata, overwrite=overwrite
    )
    return [
        SpecReport(j.path, not j.errors, errors=j.errors, warnings=j.warnings, output=j.output)
        for j in jobs
    ]


class Session:
    """Loads each model once and keeps one `Editor` per model across a batch."""

    def __init__(self, opts: EditOptions) -> None:
        self.opts = opts
        self._editors: dict[str, object] = {}

    def max_batch(self, editor) -> int:
        return self.opts.max_batch or editor.default_max_batch()

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
        specs,
        opts.out_dir,
        opts.out_root,
        opts.model,
        opts.seed,
        opts.metadata,
        opts.composite,
        opts.preset,
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
    started = 0
    for group in _loop_groups(session, jobs, run_order(jobs)):
        for k, _inp in group:
            started += 1
            if on_start:
                on_start(jobs[k].path, started, len(jobs))
        if len(group) > 1 and not interrupted:
            members = [(jobs[k], inp) for k, inp in group]
            reports = _run_group(session, members, opts, progress, stop)
        else:
            reports = [
                _run_after(session, jobs, k, by_index, opts, progress, stop, interrupted, inp)
                for k, inp in group
            ]
        for (k, _inp), rep in zip(group, reports):
            interrupted = interrupted or rep.interrupted
            by_index[k] = rep
            if on_report:
                on_report(rep)
    return [by_index[k] for k in range(len(jobs))]


def _run_after(
    session: Session,
    jobs: list[Job],
    k: int,
    done: dict[int, SpecReport],
    opts: EditOptions,
    progress: Progress | None,
    stop: Callable[[], bool] | None,
    interrupted: bool,
    inp: EditInputs | None = None,
) -> SpecReport:
    """Job k alone, unless a spec whose output it reads has failed (`inp`: its inputs, when
    already loaded)."""
    failed = [jobs[d].path for d in jobs[k].after if not done[d].ok]
    if failed:
        why = f"{jobs[k].path}: not run: it reads the output of {failed[0]}, which failed"
        return SpecReport(jobs[k].path, False, errors=[why], output=jobs[k].output)
    return _run_job(session, jobs[k], opts, progress, stop, interrupted, inp)


def _loop_groups(
    session: Session, jobs: list[Job], order: list[int]
) -> Iterable[list[tuple[int, EditInputs | None]]]:
    """The jobs in run order, as groups that share one sampler loop: neighbours with equal
    `Editor.batch_key`s, up to the editor's max batch. A job that reads another's output, fails
    its checks, or cannot be keyed runs alone (with its inputs loaded again, and its failure
    reported, by `_run_job`)."""
    pending: list[tuple[int, EditInputs | None]] = []
    pending_key = None
    batching = session.opts.max_batch != 1
    for k in order:
        key, inp, limit = _loop_key(session, jobs[k]) if batching else (None, None, None)
        if key is not None and pending and key == pending_key and len(pending) < (limit or 1):
            pending.append((k, inp))
            continue
        if pending:
            yield pending
        pending, pending_key = [(k, inp)], key
        if key is None:
            yield pending
            pending = []
    if pending:
        yield pending


def _loop_key(session: Session, job: Job) -> tuple[tuple | None, EditInputs | None, int | None]:
    """(the job's batch key, its inputs, its editor's max batch), or Nones when it runs alone."""
    if job.errors or job.spec is None or job.output is None or job.after:
        return None, None, None
    try:
        editor = session.editor(job.spec.spec.model)
        limit = session.max_batch(editor)
        if limit < 2:
            return None, None, limit
        inp = load_inputs(job.spec)
    except DragonError:
        return None, None, None
    spec = in_family(job.spec, editor.bundle.family).spec
    key = editor.batch_key(spec, inp)
    return (None if key is None else (spec.model, key)), inp, limit


def _run_group(
    session: Session,
    group: list[tuple[Job, EditInputs | None]],
    opts: EditOptions,
    progress: Progress | None,
    stop: Callable[[], bool] | None,
) -> list[SpecReport]:
    """Edits of one source in one loop, each written and reported as `edit_one` would."""
    t0 = time.perf_counter()
    reports, runnable = [], []
    for job, inp in group:
        assert job.spec is not None and job.output is not None and inp is not None
        rep = SpecReport(job.path, False, warnings=list(inp.warnings), output=job.output)
        reports.append(rep)
        if not _finished_before_editing(job.spec, job.output, opts, rep):
            runnable.append((job, inp, rep))
    items = [(job.spec, inp) for job, inp, _rep in runnable]
    results: list[Edited | BaseException] = []
    try:
        if items:  # every member may be up to date already
            results = list(compute_edits(session, items, opts, progress, stop))  # type: ignore[arg-type]
    except Exception as e:
        results = [e] * len(items)
    for (job, inp, rep), out in zip(runnable, results):
        try:
            if isinstance(out, BaseException):
                raise out
            write_edited(job.spec, inp, job.output, opts, out)  # type: ignore[arg-type]
            rep.ok, rep.inversions = True, out.inversions
            rep.warnings += out.warnings
        except Exception as e:
            message = failure_message(job.path, job.output, e)
            if message is None:
                raise
            rep.errors.append(message)
            rep.interrupted = isinstance(e, EditInterrupted)
    share = (time.perf_counter() - t0) / len(group)
    for rep in reports:
        rep.seconds = share
    return reports


def refuse_clobbering(jobs: list[Job], overwrite: bool) -> None:
    """Outputs may replace nothing, or files dragonctl wrote; anything else needs --overwrite."""
    lines = [line for j in jobs for line in clobber_problems(j, "pass --overwrite to replace it")]
    if lines and not overwrite:
        raise UsageError("\n".join(lines))


def _run_job(
    session: Session,
    job: Job,
    opts: EditOptions,
    progress: Progress | None,
    stop: Callable[[], bool] | None,
    interrupted: bool,
    inp: EditInputs | None = None,
) -> SpecReport:
    if job.errors or job.spec is None or job.output is None:
        return SpecReport(job.path, False, errors=job.errors)
    if interrupted:
        return SpecReport(
            job.path, False, errors=[f"{job.path}: not run (interrupted)"], output=job.output
        )
    try:
        # decoded again (unless just now): a file changed since the check fails here
        inp = inp or load_inputs(job.spec)
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
    out = compute_edits(session, [(ls, inp)], opts, progress, stop, [digests])[0]
    if isinstance(out, BaseException):
        raise out
    return out


def compute_edits(
    session: Session,
    items: list[tuple[LoadedSpec, EditInputs]],
    opts: EditOptions,
    progress: Progress | None = None,
    stop: Callable[[], bool] | None = None,
    digests: list[dict[str, str] | None] | None = None,
) -> list[Edited | DragonError]:
    """Run edits of one source in one sampler loop (one model, equal `Editor.batch_key`s);
    nothing is written. An edit that failed by itself (it diverged) comes back as its error;
    what fails the loop (an interruption, out of memory) is raised."""
    from dragonctl import outputs

    editor = session.editor(items[0][0].spec.model)
    # a hub model's family is unknown until it was downloaded
    loaded = [(in_family(ls, editor.bundle.family), inp) for ls, inp in items]
    results = editor.edit_batch([(ls.spec, inp) for ls, inp in loaded], progress, stop)
    b = editor.bundle
    warnings = list(editor.cache.warnings)
    editor.cache.warnings.clear()
    out: list[Edited | DragonError] = []
    for k, ((ls, inp), result) in enumerate(zip(loaded, results)):
        if isinstance(result, DragonError):
            out.append(result)
            continue
        record = None
        if opts.metadata:
            known = digests[k] if digests else None
            inputs = known if known is not None else input_digests(ls, inp.source_bytes)
            record = outputs.metadata_record(
                ls.spec,
                ls.path,
                {**b.identity, "a1111_model_hash": b.model_hash},  # the PNG's `Model hash`
                result.timings,
                {"inputs": inputs, "stats": _sidecar_stats(result)},
            )
        out.append(
            Edited(
                result.image,
                record,
                b.name,
                b.model_hash if opts.metadata else "",
                result.inversions,
                warnings,
            )
        )
    return out


def in_family(ls: LoadedSpec, family: str) -> LoadedSpec:
    """The spec over its model's family's defaults (a hub model's family is known only once it
    has loaded)."""
    return ls if ls.family == family else ls.for_family(family)


def _sidecar_stats(result) -> dict:
    """What the metadata says of an edit's work."""
    st = result.stats
    stats = {
        "unet_forward": st.unet_forward,
        "unet_backward": st.unet_backward,
        "inversions": result.inversions,
        "edited_fraction": round(result.edited_fraction, 6),
        "working_size": [result.frame.work_w, result.frame.work_h],  # the model's grid, in px
        # with other edits in the loop: its own rows and its part of the shared bank rows
        "unet_row_passes": round(st.unet_row_passes, 2),
    }
    if st.edits > 1:
        stats["edits_in_loop"] = st.edits
    if st.image_prompt_steps:
        stats["image_prompt_steps"] = st.image_prompt_steps
    return stats


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
    if _finished_before_editing(ls, out, opts, rep):
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


def _finished_before_editing(ls: LoadedSpec, out: Path, opts: EditOptions, rep: SpecReport) -> bool:
    """Whether the report is complete without an edit: the output cannot be written (a single
    spec's edit, or a file that changed since the batch's check), or it is up to date."""
    problems = output_problems(ls, out, opts.metadata)
    if problems:
        rep.errors += [f"{ls.path}: output: {p}" for p in problems]
        return True
    if opts.skip_existing and up_to_date(ls, out):
        rep.ok, rep.skipped = True, True
        return True
    return False


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
    """Fill the cache with each spec's bank inversions: the source's (a whole copy's in its
    place), and its second image's."""
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
            frame = ed.frame_for(inp.source, ls.spec.resolution, ls.spec.max_resolution)
            schedule = Schedule.from_config(ed.bundle.scheduler_config, ls.spec.steps)
            plan = build_plan(ls.spec, inp, frame, ed.bundle.latent_factor)  # its bank images
            ed.memory_bank(ls.spec, inp, frame, plan, schedule, progress)
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
