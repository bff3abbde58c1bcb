"""Batches on Ray: the same `dragonctl edit` over every GPU of a box, or a cluster.

The driver checks every spec first, as `edit` does, then reads each spec's input files and ships
their bytes through Ray's object store: no shared filesystem is assumed. One actor per GPU (or per
`cpus_per_worker` CPU cores) loads the model once and keeps it, with its inverted trajectories,
for its whole life; it edits one spec per call and sends the image and its metadata back, and the
driver writes every result itself, atomically, under the batch's output paths.

Specs that share a source (and chains of specs that read each other's outputs) form one unit that
runs in order on one worker, so each source is inverted once per batch. A worker that dies (killed,
lost node, out of memory) loses nothing: the unfinished specs of its unit go back to the queue,
for a replacement worker, at most `MAX_ATTEMPTS` times per spec; a spec whose edit fails by itself
is reported once. Stopping (Ctrl-C) cancels what is running; nothing half-written is left, since
only finished results are written.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from dragonctl.api import (
    Edited,
    EditOptions,
    Session,
    SpecReport,
    compute_edit,
    failure_message,
    input_digests,
    up_to_date,
    write_edited,
)
from dragonctl.batch import Job, chains
from dragonctl.errors import DragonError, SpecError, UsageError
from dragonctl.inputs import input_files, load_inputs, read_file
from dragonctl.paths import output_problems
from dragonctl.spec import LoadedSpec

MAX_ATTEMPTS = 3  # a spec whose worker died this many times is reported as failed
POLL_S = 0.25  # how often the driver looks at the stop flag while edits run

# (done, failed, running: worker → spec name, total)
BatchStatus = Callable[[int, int, dict[str, str], int], None]


@dataclass
class WorkerResult:
    """What a worker sends back for one spec: the edit, or why it failed."""

    edited: Edited | None
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


class EditWorker:
    """A Ray actor: one loaded model (per model named), editing one shipped spec per call."""

    def __init__(self, opts: EditOptions, threads: int) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.opts = replace(opts, threads=threads)
        self.session = Session(self.opts)

    def where(self) -> str:
        import ray

        ctx = ray.get_runtime_context()
        return f"{ctx.get_node_id()[:8]}/{ctx.get_actor_id()[:8]}"

    def edit(self, ls: LoadedSpec, files: dict[str, bytes], digests: dict[str, str]):
        t0 = time.perf_counter()

        def read(path: Path) -> bytes:
            if str(path) not in files:
                raise FileNotFoundError(path)
            return files[str(path)]

        try:
            inp = load_inputs(ls, read)
        except SpecError as e:
            return WorkerResult(None, errors=[str(x) for x in e.problems])
        try:
            edited = compute_edit(self.session, ls, inp, self.opts, digests=digests)
        except Exception as e:
            message = failure_message(ls.path, None, e)
            if message is None:
                raise
            return WorkerResult(None, list(inp.warnings), [message], time.perf_counter() - t0)
        return WorkerResult(edited, list(inp.warnings), [], time.perf_counter() - t0)


@dataclass
class _Slot:
    """One worker as the driver sees it: its actor, its unit of specs, what it is running."""

    actor: object
    name: str
    unit: deque[int] = field(default_factory=deque)
    running: int | None = None
    ref: object = None


def work_units(jobs: list[Job]) -> list[list[int]]:
    """Runnable jobs in units that stay on one worker: each source group with the chains that
    touch it, in run order, largest first."""
    units: dict[tuple[str, str], list[int]] = {}
    for chain in chains(jobs):
        live = [k for k in chain if jobs[k].spec is not None and not jobs[k].errors]
        if live:
            units.setdefault(jobs[live[0]].source_group, []).extend(live)
    return sorted(units.values(), key=len, reverse=True)


def connect(address: str | None) -> bool:
    """Join the cluster at `address` (else `RAY_ADDRESS`, Ray's own convention), or start a local
    runtime over this machine. Returns whether this call started Ray (and so shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UsageError(f"cannot join the Ray cluster at {address}: {e}") from None
    return True


def worker_shape(workers: int | None, cpus_per_worker: int | None, device: str) -> tuple[int, dict]:
    """How many actors, and each one's Ray resources: one per GPU when the cluster has GPUs (and
    the device is not `cpu`), else one per `cpus_per_worker` cores."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus and device != "cpu":
        return min(gpus, workers or gpus), {"num_gpus": 1, "num_cpus": 1}
    cpus = max(1, int(resources.get("CPU", 1)))
    per = cpus_per_worker or (max(1, cpus // workers) if workers else 1)
    return max(1, min(cpus // per, workers or cpus)), {"num_cpus": per}


def edit_on_ray(
    jobs: list[Job],
    opts: EditOptions,
    on_report: Callable[[SpecReport], None] | None = None,
    stop: Callable[[], bool] | None = None,
    on_status: BatchStatus | None = None,
) -> list[SpecReport]:
    """Run checked jobs on Ray (see the module's docstring); one report per job, in order."""
    import ray

    started = connect(opts.ray_address)
    try:
        return _Batch(jobs, opts, on_report, stop, on_status).run(ray)
    finally:
        if started:
            ray.shutdown()


class _Batch:
    def __init__(self, jobs, opts, on_report, stop, on_status) -> None:
        self.jobs: list[Job] = jobs
        self.opts: EditOptions = opts
        self.on_report = on_report
        self.stop = stop or (lambda: False)
        self.on_status = on_status
        self.reports: dict[int, SpecReport] = {}
        self.attempts: dict[int, int] = {}
        self.queue: deque[deque[int]] = deque()
        self.failed = 0

    def report(self, k: int, rep: SpecReport) -> None:
        self.reports[k] = rep
        self.failed += not rep.ok
        if self.on_report:
            self.on_report(rep)

    def run(self, ray) -> list[SpecReport]:
        for k, job in enumerate(self.jobs):
            if job.spec is None or job.errors:
                self.report(k, SpecReport(job.path, False, errors=job.errors))
        self.queue = deque(deque(u) for u in work_units(self.jobs))
        n, resources = worker_shape(self.opts.workers, self.opts.cpus_per_worker, self.opts.device)
        threads = int(resources.get("num_cpus", 1)) if "num_gpus" not in resources else None
        actor_class = ray.remote(EditWorker)
        batch = uuid.uuid4().hex[:8]
        count = iter(range(1 << 30))
        # named, so `ray list actors` (and tests) can find a batch's workers
        self.spawn = lambda: actor_class.options(
            name=f"dragonctl-{batch}-{next(count)}", **resources
        ).remote(self.opts, threads)
        spares = 2 * n  # replacement workers, at most
        slots = [self._slot(ray) for _ in range(min(n, len(self.queue)))]
        interrupted = False
        while slots and (self.queue or any(s.running is not None or s.unit for s in slots)):
            for s in slots:
                if s.running is None:
                    self._dispatch(s)
            self._status(slots)
            busy = {s.ref: s for s in slots if s.running is not None}
            if not busy:
                continue
            done, _ = ray.wait(list(busy), num_returns=1, timeout=POLL_S)
            if self.stop():
                interrupted = True
                break
            for ref in done:
                s = busy[ref]
                try:
                    self._finish(s, ray.get(ref))
                except ray.exceptions.RayTaskError as e:  # a bug, not a lost worker: once
                    k, s.running, s.ref = s.running, None, None
                    why = f"{self.jobs[k].path}: edit failed: {str(e).splitlines()[-1]}"
                    self.report(k, SpecReport(self.jobs[k].path, False, [why], worker=s.name))
                    continue
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
                    self._lost(s)
                    slots.remove(s)
                    if spares > 0:
                        spares -= 1
                        slots.append(self._slot(ray))
        for s in slots:
            if s.running is not None:  # interrupted: its result would be dropped anyway
                ray.kill(s.actor)
                s.unit.appendleft(s.running)
                self.queue.appendleft(s.unit)
        why = "interrupted" if interrupted else "no Ray worker left to run it"
        for unit in self.queue:
            for k in unit:
                j = self.jobs[k]
                errors = [f"{j.path}: not run ({why})"]
                rep = SpecReport(j.path, False, errors, output=j.output, interrupted=interrupted)
                self.report(k, rep)
        return [self.reports[k] for k in range(len(self.jobs))]

    def _slot(self, ray) -> _Slot:
        actor = self.spawn()
        return _Slot(actor, ray.get(actor.where.remote()))

    def _dispatch(self, s: _Slot) -> None:
        """Send the slot its unit's next spec (a new unit when its own is done)."""
        while True:
            if not s.unit:
                if not self.queue:
                    return
                s.unit = self.queue.popleft()
            k = s.unit.popleft()
            job = self.jobs[k]
            failed = [self.jobs[d].path for d in job.after if not self.reports[d].ok]
            if failed:
                why = f"{job.path}: not run: it reads the output of {failed[0]}, which failed"
                self.report(k, SpecReport(job.path, False, [why], [], job.output))
                continue
            payload = self._payload(k)
            if payload is None:
                continue
            s.running, s.ref = k, s.actor.edit.remote(*payload)
            return

    def _payload(self, k: int):
        """The spec, its input files' bytes and their hashes; None when it is reported here
        (up to date, or its files cannot be read)."""
        job = self.jobs[k]
        ls, out = job.spec, job.output
        assert ls is not None and out is not None
        problems = output_problems(ls, out, self.opts.metadata)
        if problems:
            self.report(
                k,
                SpecReport(
                    job.path, False, [f"{job.path}: output: {p}" for p in problems], [], out
                ),
            )
            return None
        if self.opts.skip_existing and up_to_date(ls, out):
            self.report(k, SpecReport(job.path, True, output=out, skipped=True))
            return None
        try:
            files = {str(p): read_file(p) for p in input_files(ls).values()}
            digests = input_digests(ls, files[str(ls.resolve(ls.spec.image))])
        except (OSError, ValueError) as e:
            why = getattr(e, "strerror", None) or e
            self.report(
                k,
                SpecReport(job.path, False, [f"{job.path}: cannot read an input: {why}"], [], out),
            )
            return None
        return ls, files, digests

    def _finish(self, s: _Slot, res: WorkerResult) -> None:
        k, job = s.running, self.jobs[s.running]
        s.running = s.ref = None
        rep = SpecReport(job.path, False, list(res.errors), list(res.warnings), job.output)
        rep.seconds, rep.worker = res.seconds, s.name
        if res.edited is not None:
            try:
                inp = load_inputs(job.spec) if self.opts.save_preview else None
                write_edited(job.spec, inp, job.output, self.opts, res.edited)
                rep.ok, rep.inversions = True, res.edited.inversions
                rep.warnings += res.edited.warnings
            except (DragonError, OSError) as e:
                rep.errors.append(failure_message(job.path, job.output, e) or str(e))
        self.report(k, rep)

    def _lost(self, s: _Slot) -> None:
        """The slot's worker died: its running spec and the rest of its unit go back in line."""
        k = s.running
        s.running = s.ref = None
        self.attempts[k] = self.attempts.get(k, 0) + 1
        if self.attempts[k] >= MAX_ATTEMPTS:
            job = self.jobs[k]
            why = f"{job.path}: its Ray worker died {MAX_ATTEMPTS} times running it"
            self.report(k, SpecReport(job.path, False, [why], [], job.output, worker=s.name))
        else:
            s.unit.appendleft(k)
        if s.unit:
            self.queue.appendleft(s.unit)

    def _status(self, slots: list[_Slot]) -> None:
        if self.on_status:
            running = {
                s.name: self.jobs[s.running].path.name for s in slots if s.running is not None
            }
            self.on_status(len(self.reports) - self.failed, self.failed, running, len(self.jobs))
