"""The `dragonctl` command: a thin Typer shell over `dragonctl.api`.

Exit codes: 0 all done; 1 some edits failed (invalid specs in an edit batch included; the rest still
ran); 2 bad usage, or for `validate`, any invalid spec. Heavy imports (torch, diffusers) happen only
inside the commands that need them, so `--help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import typer

# Before torch loads (commands import it lazily): OpenMP threads that spin while waiting made
# torch 6-20x slower on a busy machine; passive waiting costs little on an idle one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SPEC_EXAMPLE = """
A spec is a YAML file; paths in it are relative to it:

\b
    version: 1
    image: photo.png
    mode: move                     # move | resize | drag | appearance | paste
    prompt: "a photo of a cup"
    mask: {box: [120, 80, 260, 240]}   # or mask.png, {polygon: [[x,y],...]}, {circle: [cx,cy,r]}
    offset: [60, 0]                # move: dx, dy in source pixels
    model: shapes                  # default: Stable Diffusion 1.5
    seed: 42

\b
Drag:       points: [[[hx, hy], [tx, ty]], ...]   (mask = the editable region)
Resize:     scale: 1.3             (about the object's centre)
Appearance: reference: {image: ref.png, mask: ref_mask.png, prompt: ""}
Paste:      reference: {...}, at: [x, y], scale: 0.8
Tuning:     guidance: {method: diffeditor, energy_scale: 0.5, cfg_scale: 4}

Start from `dragonctl init MODE IMAGE`, check with `dragonctl validate` and `dragonctl preview`.
"""

app = typer.Typer(
    name="dragonctl",
    help="Drag-style image edits (DragonDiffusion / DiffEditor) declared in YAML specs.\n"
    + SPEC_EXAMPLE,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
cache_app = typer.Typer(
    help="Inspect or clear the inversion cache.",
    no_args_is_help=True,
    context_settings=HELP_OPTIONS,
)
app.add_typer(cache_app, name="cache")
bench_app = typer.Typer(
    help="Benchmarks: edit quality on the shapes world, speed and memory.",
    no_args_is_help=True,
    context_settings=HELP_OPTIONS,
)
app.add_typer(bench_app, name="bench")
import_app = typer.Typer(
    help="Import specs from other formats.", no_args_is_help=True, context_settings=HELP_OPTIONS
)
app.add_typer(import_app, name="import")


def _print_version(value: bool) -> None:
    if value:
        from dragonctl import __version__

        typer.echo(f"dragonctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version."
    ),
) -> None:
    pass


def _err(msg: str) -> None:
    from dragonctl.errors import printable

    typer.echo("\n".join(printable(line, 2000) for line in msg.splitlines()), err=True)


def _usage(msg: str) -> None:
    _err(f"error: {msg}")
    raise typer.Exit(2)


@contextlib.contextmanager
def _reported_errors():
    """A command's own errors (bad model, device, dtype, unreadable inputs): one line, exit 1."""
    from dragonctl.errors import DragonError

    try:
        yield
    except DragonError as e:
        _err(f"error: {e}")
        raise typer.Exit(1) from None


def _progress(enabled: bool):
    """A rich progress bar per phase, and one for the batch, on a terminal; nothing otherwise.
    Returns (bar, the engine's progress callback, the batch's on_start callback, and on Ray the
    batch's status callback)."""
    if not enabled or not sys.stderr.isatty():
        return None, None, None, None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description:>10}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        transient=True,
    )
    tasks: dict[str, int] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks or done == 1:
            if phase in tasks:
                bar.remove_task(tasks[phase])
            tasks[phase] = bar.add_task(phase, total=total)
        bar.update(tasks[phase], completed=done)

    def started(spec: Path, i: int, n: int) -> None:
        """The batch's own line: which spec, i of n."""
        if "specs" not in tasks:
            tasks["specs"] = bar.add_task("", total=n)
        bar.update(tasks["specs"], completed=i - 1, description=f"{spec.name} ({i} of {n})")

    def status(done: int, failed: int, running: dict[str, str], n: int) -> None:
        """On Ray: one line for the whole batch, then one per busy worker."""
        line = f"{done} done · {failed} failed · {len(running)} running"
        if "specs" not in tasks:
            tasks["specs"] = bar.add_task("", total=n)
        bar.update(tasks["specs"], completed=done + failed, description=line)
        for name in [t for t in tasks if t.startswith("worker ")]:
            bar.remove_task(tasks.pop(name))
        for worker, spec in running.items():
            tasks[f"worker {worker}"] = bar.add_task(f"{worker}: {spec}", total=None)

    return bar, update, started, status


class _StopOnInterrupt:
    """First Ctrl-C: the edit in progress stops at its next step (every step polls), or, where
    nothing polls within `grace` seconds (a model loading, a decode), at once; a second Ctrl-C
    aborts at once. Either way an image and its sidecar are written whole or not at all."""

    def __init__(self, grace: float = 0.5) -> None:
        self.requested = False
        self.grace = grace
        self._old = None
        self._timer = None

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum, frame) -> None:
        from dragonctl.files import interrupt_now

        if self.requested:
            interrupt_now()
            return
        self.requested = True
        _err("stopping after the current step (Ctrl-C again to abort)")
        import threading

        self._timer = threading.Timer(self.grace, _signal_main_thread)
        self._timer.daemon = True
        self._timer.start()

    def __enter__(self) -> _StopOnInterrupt:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._timer is not None:
            self._timer.cancel()
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _signal_main_thread() -> None:
    """SIGINT to the main thread itself: a real signal also cuts short a blocking call there (a
    sleep, a read), where `_thread.interrupt_main` would wait for it to return."""
    import signal
    import threading

    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    else:  # Windows
        import _thread

        _thread.interrupt_main()


# some of `edit`'s options (here, so its signature stays readable)
COMPOSITE_OPTION = typer.Option(
    None,
    "--composite/--no-composite",
    help="Blend the edit into the source, which keeps its own pixels away from the edit "
    "(default: each spec's `composite`, true unless set); --no-composite writes the whole "
    "generation resized to the source's size.",
    show_default=False,
)
RAY_OPTION = typer.Option(
    False,
    "--ray",
    help="Run the batch on Ray: the cluster at RAY_ADDRESS (or --ray-address), else a local "
    "Ray runtime over this machine; one worker per GPU (or per --cpus-per-worker cores). "
    'Needs `pip install "dragonctl[ray]"`.',
)
RAY_ADDRESS_OPTION = typer.Option(
    None, "--ray-address", help="The Ray cluster to join (overrides RAY_ADDRESS)."
)
WORKERS_OPTION = typer.Option(None, "--workers", min=1, help="At most N Ray workers.")
CPUS_PER_WORKER_OPTION = typer.Option(
    None, "--cpus-per-worker", min=1, help="CPU cores per Ray worker when there are no GPUs."
)
COMPILE_OPTION = typer.Option(
    False,
    "--compile",
    help="Compile the UNet's step-loop forward (CUDA graphs on a GPU). Costs a one-off "
    "warm-up per image size (seconds to a minute), then each edit runs faster: "
    "for batches, not single edits. Same results.",
)
THREADS_OPTION = typer.Option(
    None, "--threads", min=1, help="CPU threads for torch (default: torch's, one per core)."
)
PRESET_OPTION = typer.Option(
    None,
    "--preset",
    help="Every spec's preset: a named set of defaults from the model's config, e.g. fast "
    "(half the UNet work; its cost in quality is in the README). A spec's own fields win.",
)
MAX_BATCH_OPTION = typer.Option(
    None,
    "--max-batch",
    min=1,
    help="At most K edits of one source share one sampler loop (specs with the same "
    "source, prompt, resolution and steps; same results, fewer UNet rows per edit). "
    "Default: as many as free GPU memory holds; 1 on the CPU.",
)
OVERWRITE_OPTION = typer.Option(
    False,
    "--overwrite",
    help="Replace existing files that dragonctl did not write (without it they are refused).",
)


@app.command()
def edit(
    specs: list[str] = typer.Argument(
        None, help="Spec files, folders (searched for *.yaml) or globs."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output folder; mirrors the specs' layout."
    ),
    model: str | None = typer.Option(
        None, help="Override every spec's model: shapes, a hub id, a folder, a .safetensors."
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option(
        "auto", help="auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16 or bf16."
    ),
    seed: int | None = typer.Option(None, help="Override every spec's seed."),
    cache_dir: Path | None = typer.Option(
        None, help="Inversion cache folder (default: $DRAGONCTL_CACHE or the user cache)."
    ),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Neither read nor write the inversion cache."
    ),
    local_files_only: bool = typer.Option(
        False, "--local-files-only", help="Never download model files."
    ),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Allow .ckpt/.bin checkpoints (they can run code)."
    ),
    no_metadata: bool = typer.Option(
        False, "--no-metadata", help="Write no PNG metadata and no sidecar JSON."
    ),
    save_preview: bool = typer.Option(
        False, "--save-preview", help="Also write an overlay and a side-by-side."
    ),
    skip_existing: bool = typer.Option(
        False, "--skip-existing", help="Skip specs whose output exists with the same spec."
    ),
    overwrite: bool = OVERWRITE_OPTION,
    threads: int | None = THREADS_OPTION,
    compile: bool = COMPILE_OPTION,
    composite: bool | None = COMPOSITE_OPTION,
    ray: bool = RAY_OPTION,
    ray_address: str | None = RAY_ADDRESS_OPTION,
    workers: int | None = WORKERS_OPTION,
    cpus_per_worker: int | None = CPUS_PER_WORKER_OPTION,
    preset: str | None = PRESET_OPTION,
    max_batch: int | None = MAX_BATCH_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON record per spec on stdout."),
) -> None:
    """Run edits. Example: dragonctl edit samples/move.yaml --out results/"""
    from dragonctl import api

    paths = _spec_paths(specs)
    _check_device_and_dtype(device, dtype)
    opts = api.EditOptions(
        out_dir=out,
        model=model,
        device=device,
        dtype=dtype,
        seed=seed,
        cache_dir=cache_dir,
        no_cache=no_cache,
        local_files_only=local_files_only,
        allow_pickle=allow_pickle,
        metadata=not no_metadata,
        save_preview=save_preview,
        skip_existing=skip_existing,
        overwrite=overwrite,
        threads=threads,
        compile="on" if compile else "off",
        composite=composite,
        ray=ray or ray_address is not None,
        ray_address=ray_address,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        max_batch=max_batch,
        preset=preset,
    )
    _run_batch(paths, opts, as_json)


def _spec_paths(specs: list[str] | None) -> list[Path]:
    """The spec files named (files, folders, globs), or a usage error."""
    from dragonctl import api

    if not specs:
        _usage("give at least one spec file, folder or glob")
    missing = [s for s in specs if not any(ch in s for ch in "*?[") and not os.path.exists(s)]
    if missing:  # a mistyped name is bad usage, as `cp` takes it, not an edit that failed
        _usage(f"{missing[0]}: no such spec file or folder")
    paths = api.expand_specs(specs)
    if not paths:
        _usage(f"no spec files found in: {' '.join(specs)}")
    return paths


def _check_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        _usage('--ray needs Ray: pip install "dragonctl[ray]"')


def _check_device_and_dtype(device: str, dtype: str) -> None:
    """A device or dtype that cannot work is bad usage, said at once (not once per spec)."""
    from dragonctl.errors import ModelError
    from dragonctl.models import pick_device, pick_dtype

    try:
        for d in (x.strip() for x in device.split(",") if x.strip()):
            pick_dtype(dtype, pick_device(d))
    except ModelError as e:
        _usage(str(e))


def _run_batch(paths: list[Path], opts, as_json: bool) -> None:
    """`api.edit` with a progress bar and Ctrl-C handling; report; exit with the batch's code."""
    if opts.ray:
        _check_ray()
    from dragonctl import api
    from dragonctl.errors import DragonError, UsageError

    bar, update, started, status = _progress(not as_json)

    reported: list = []  # what the summary counts if the batch is aborted

    def on_report(rep) -> None:
        reported.append(rep)
        if as_json:
            typer.echo(json.dumps(rep.as_json()))
        elif rep.ok:
            what = "skipped (up to date)" if rep.skipped else f"{rep.seconds:.1f} s"
            msg = f"ok  {rep.path} -> {rep.output} ({what})"
            (bar.console.print(msg, highlight=False) if bar else typer.echo(msg))
        for w in rep.warnings:
            _err(f"warning: {rep.path}: {w}")

    stop = _StopOnInterrupt()
    try:
        with stop:
            if bar:
                with bar:
                    reports = api.edit(paths, opts, update, on_report, stop, started, status)
            else:
                reports = api.edit(paths, opts, None, on_report, stop)
    except UsageError as e:
        _usage(str(e))
    except DragonError as e:
        _err(f"error: {e}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        _err("aborted")  # the edit in progress and the rest were not run
        reports, stop.requested = reported, True
    _finish(reports, as_json, stop.requested)


def _finish(reports: list, as_json: bool, interrupted: bool) -> None:
    failed = [r for r in reports if not r.ok]
    if not as_json:
        _err(f"{len(reports) - len(failed)} done, {len(failed)} failed")
    for r in failed:
        for line in r.errors:
            _err(f"failed: {line}")
    if interrupted:
        _err(
            "interrupted: the edit in progress was abandoned (nothing half-written); "
            "rerun with --skip-existing to resume"
        )
        raise typer.Exit(130)
    raise typer.Exit(1 if failed else 0)


@app.command()
def validate(
    specs: list[str] = typer.Argument(None, help="Spec files, folders or globs."),
    model: str | None = typer.Option(None, help="Validate as if run with this --model."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Check outputs under this folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="As `edit --overwrite`."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON record per spec."),
) -> None:
    """Check specs as `edit` does before it runs, without loading a model: fields, files (fully
    decoded), masks, points, outputs. Exit 2 if any is invalid."""
    from dragonctl import api
    from dragonctl.errors import UsageError

    paths = _spec_paths(specs)
    try:
        reports = api.validate(paths, model=model, out_dir=out, overwrite=overwrite)
    except UsageError as e:
        _usage(str(e))
    for r in reports:
        if as_json:
            typer.echo(json.dumps(r.as_json()))
        elif r.ok:
            typer.echo(f"ok  {r.path}")
        for e in r.errors:
            _err(e)
        for w in r.warnings:
            _err(f"warning: {r.path}: {w}")
    bad = sum(not r.ok for r in reports)
    if not as_json:
        _err(f"{len(reports) - bad} valid, {bad} invalid")
    raise typer.Exit(2 if bad else 0)


@app.command()
def preview(
    spec: Path = typer.Argument(..., help="One spec file."),
    output: Path | None = typer.Option(
        None, "-o", "--output", help="PNG to write (default: SPEC.preview.png)."
    ),
) -> None:
    """Draw the source with its masks, arrows and target region (and the reference) into one PNG."""
    from dragonctl import api
    from dragonctl.errors import DragonError, SpecError

    try:
        out = api.preview(spec, output)
    except SpecError as e:
        for p in e.problems:
            _err(str(p))
        raise typer.Exit(2) from None
    except (DragonError, OSError) as e:
        _err(f"error: {e}")
        raise typer.Exit(1) from None
    typer.echo(str(out))


@app.command()
def init(
    mode: str = typer.Argument(..., help="move, resize, drag, appearance or paste."),
    image: Path = typer.Argument(..., help="The source image."),
    output: Path | None = typer.Option(
        None, "-o", "--output", help="Write here instead of stdout."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    reference: Path | None = typer.Option(
        None, "--reference", help="appearance, paste: the reference image (default: IMAGE)."
    ),
) -> None:
    """Write a commented starter spec for MODE on IMAGE."""
    from dragonctl import api
    from dragonctl.errors import DragonError, SpecError
    from dragonctl.inputs import read_image

    try:
        arr, _ = read_image(image, Path("<init>"), "image")
        rel = image if output is None else Path(_relpath(image, output.parent))
        ref = None
        if reference is not None:
            read_image(reference, Path("<init>"), "reference")
            ref = reference if output is None else Path(_relpath(reference, output.parent))
        text = api.init_spec(
            mode, rel.as_posix(), arr.shape[1], arr.shape[0], ref.as_posix() if ref else None
        )
    except SpecError as e:
        _usage(str(e.problems[0]).replace("<init>: image: ", "").replace("<init>: ", ""))
    except DragonError as e:
        _usage(str(e))
    if output is None:
        typer.echo(text, nl=False)
        return
    if output.suffix not in (".yaml", ".yml"):
        _usage(f"{output}: spec files end in .yaml or .yml")
    if output.resolve() == image.resolve():
        _usage(f"{output} is the image itself")
    if output.exists() and not force:
        _usage(f"{output} exists; pass --force to overwrite it")
    from dragonctl.files import atomic_write

    atomic_write(output, text.encode())
    typer.echo(str(output))


def _relpath(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target.resolve(), start.resolve())


@app.command()
def invert(
    specs: list[str] = typer.Argument(None, help="Spec files, folders or globs."),
    model: str | None = typer.Option(None, help="Override every spec's model."),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
    cache_dir: Path | None = typer.Option(None, help="Inversion cache folder."),
    local_files_only: bool = typer.Option(False, "--local-files-only"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
) -> None:
    """Fill the inversion cache ahead of time, so later edits of the same sources skip inversion."""
    from dragonctl import api

    paths = _spec_paths(specs)
    _check_device_and_dtype(device, dtype)
    opts = api.EditOptions(
        model=model,
        device=device,
        dtype=dtype,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        allow_pickle=allow_pickle,
    )
    reports = api.invert(paths, opts)
    for r in reports:
        if r.ok:
            typer.echo(
                f"ok  {r.path} "
                f"({'cached already' if r.inversions == 0 else f'{r.inversions} inverted'})"
            )
        for e in r.errors:
            _err(e)
    raise typer.Exit(1 if any(not r.ok for r in reports) else 0)


@cache_app.command("info")
def cache_info(cache_dir: Path | None = typer.Option(None, help="Cache folder.")) -> None:
    """Where the cache is, how many entries, how big."""
    from dragonctl.cache import TrajectoryCache

    c = TrajectoryCache(cache_dir)
    typer.echo(f"location: {c.root}\nentries: {len(c.entries())}\nsize: {c.size() / 2**20:.1f} MiB")


@cache_app.command("clear")
def cache_clear(
    cache_dir: Path | None = typer.Option(None, help="Cache folder."),
    older_than: float | None = typer.Option(None, help="Only entries unused for this many days."),
) -> None:
    """Remove cache entries."""
    from dragonctl.cache import TrajectoryCache

    if older_than is not None and not older_than >= 0:  # a negative age would clear everything
        _usage(f"--older-than takes a number of days ≥ 0, not {older_than}")
    n = TrajectoryCache(cache_dir).clear(None if older_than is None else older_than * 86400)
    typer.echo(f"removed {n} entries")


def _key_values(option: str, items: list[str] | None) -> dict:
    """KEY=VALUE options (each value read as YAML)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            _usage(f"{option} takes KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _bench_modes(modes: list[str] | None, world: str) -> tuple[str, ...]:
    """The quality bench's case sets, checked (and its world)."""
    from dragonctl.bench import quality

    if world not in quality.WORLDS:
        _usage(f"--world: unknown world {world!r}; choose from {', '.join(quality.WORLDS)}")
    chosen = tuple(modes) if modes else quality.CASE_SETS
    bad = [m for m in chosen if m not in quality.CASE_SETS]
    if bad:
        _usage(f"unknown mode(s): {', '.join(bad)}; choose from {', '.join(quality.CASE_SETS)}")
    return chosen


@bench_app.command("quality")
def bench_quality(
    out: Path = typer.Argument(
        Path("runs/quality"), help="Folder for specs, results, contact sheets, quality.json."
    ),
    cases: int = typer.Option(50, help="Cases per mode."),
    mode: list[str] = typer.Option(
        None,
        help="Only these modes (repeatable); drag_part: drags whose editable region covers only "
        "part of the object, which must stretch.",
    ),
    model: str = typer.Option(
        "shapes", help="Model to test (the ground truth is the shapes world)."
    ),
    seed: int = typer.Option(1000, help="Case generator seed (training never uses 1000 and up)."),
    method: str | None = typer.Option(None, help="Override guidance.method for every case."),
    energy_scale: float | None = typer.Option(
        None, help="Override guidance.energy_scale for every case."
    ),
    steps: int | None = typer.Option(
        None, help="Override the number of DDIM steps for every case."
    ),
    guidance: list[str] = typer.Option(
        None, help="Any guidance setting for every case, KEY=VALUE (repeatable)."
    ),
    field: list[str] = typer.Option(
        None,
        "--field",
        help="Any top-level spec field for every case, KEY=VALUE (repeatable), e.g. "
        "inversion_refine=0.",
    ),
    size: int | None = typer.Option(
        None, help="The cases' side in px (default: a shapes model's working size, else 64)."
    ),
    baseline: bool = typer.Option(True, help="Also score plain reconstruction of each source."),
    control: bool = typer.Option(
        True,
        help="Also run each case with the denoiser replaced by a zero predictor (features, bank "
        "and energies kept): what the edit does without the model.",
    ),
    world: str = typer.Option(
        "flat",
        help="flat: flat shapes on smooth gradients; textured: patterned backgrounds, shaded and "
        "patterned shapes that may overlap, soft shadows.",
    ),
) -> None:
    """Run every mode on held-out shapes scenes and judge each case against the ground truth.

    Prints the success rate per mode beside its controls, then the metrics' medians; writes
    quality.json and contact sheets. Exits 0 when every case ran, whatever the verdicts, and 1
    when a case could not run."""
    from dragonctl.bench import quality

    overrides = {
        k: v for k, v in (("method", method), ("energy_scale", energy_scale)) if v is not None
    }
    overrides.update(_key_values("--guidance", guidance))
    fields = {"steps": steps} if steps else {}
    fields.update(_key_values("--field", field))
    modes = _bench_modes(mode, world)
    with _reported_errors():
        summary = quality.run(
            out,
            modes,
            cases,
            model,
            seed,
            overrides,
            log=lambda m: _err(m),
            spec_overrides=fields or None,
            size=size,
            baseline=baseline,
            control=control,
            world=world,
        )
    typer.echo(quality.success_table(summary) + "\n\n" + quality.table(summary))
    _err(f"wrote {out / 'quality.json'}, sheet_<mode>.png and failures_<mode>.png")
    failed = sum(m["cases"] - m["completed"] for m in summary["modes"].values())
    if failed:  # "every edit completes" is part of the bar
        _err(f"{failed} case(s) failed")
        raise typer.Exit(1)


@bench_app.command("sheets")
def bench_sheets(
    runs: list[Path] = typer.Argument(..., help="Folders written by `bench quality`."),
    out: Path = typer.Option(Path("runs/sheets"), "--out", "-o", help="Folder for the sheets."),
    per_mode: int = typer.Option(6, min=1, help="Cases per mode: the first ones, not picked."),
    scale: int = typer.Option(3, min=1, help="Enlargement, in whole pixels."),
) -> None:
    """Two contact sheets from `bench quality` runs: before.png (each case's source with the
    edit drawn over it) and after.png (its result, framed green on success, red on failure),
    a row per mode.

    Example: dragonctl bench sheets runs/move runs/drag --out docs/images
    """
    import io

    from PIL import Image

    from dragonctl.bench import contact
    from dragonctl.files import atomic_write

    with _reported_errors():
        before, after = contact.sheets(runs, per_mode, scale)
    for name, sheet in (("before.png", before), ("after.png", after)):
        buf = io.BytesIO()
        Image.fromarray(sheet).save(buf, format="PNG", optimize=True)
        atomic_write(out / name, buf.getvalue())
    _err(f"wrote {out / 'before.png'} and {out / 'after.png'}")


@bench_app.command("speed")
def bench_speed(
    out: Path = typer.Option(Path("runs/speed.json"), "--out", "-o", help="JSON results file."),
    size: str = typer.Option(
        "sd15",
        help="sd15 or sdxl (their real sizes, random weights), or tiny / tiny_sdxl (CI checks).",
    ),
    resolution: list[int] = typer.Option([512, 768], help="Working resolutions (repeatable)."),
    mode: list[str] = typer.Option(None, help="Only these modes (repeatable; default all)."),
    method: list[str] = typer.Option(
        ["dragondiffusion"], help="dragondiffusion and/or diffeditor (repeatable)."
    ),
    kv_bank: list[str] = typer.Option(
        ["recompute"], help="recompute and/or stored (repeatable): the memory bank's K/V."
    ),
    compile: list[str] = typer.Option(
        ["off"],
        "--compile",
        help="off, on (CUDA graphs on a GPU) or a torch.compile mode (repeatable: "
        "--compile off --compile on gives eager and compiled rows).",
    ),
    steps: int = typer.Option(50, help="DDIM steps."),
    model: str | None = typer.Option(
        None, help="A real model instead of random weights (shapes: the embedded model)."
    ),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
    preset: str | None = typer.Option(None, help="Every spec's preset (e.g. fast)."),
    batch: list[int] = typer.Option(
        None,
        "--batch",
        min=1,
        help="Instead: K edits of one source in one loop, per K (repeatable: --batch 1 "
        "--batch 4 --batch 8): seconds and UNet row-passes per edit.",
    ),
) -> None:
    """Time full edits per mode: phases, UNet passes, peak memory, ratio to a plain eager loop.

    With --batch: K edits of one source per loop, per K: seconds and row-passes per edit."""
    from dragonctl.bench import speed

    if size not in ("sd15", "sdxl", "tiny", "tiny_sdxl"):
        _usage("--size is sd15, sdxl, tiny or tiny_sdxl")
    if set(kv_bank) - {"recompute", "stored"}:
        _usage("--kv-bank is recompute or stored")
    from dragonctl.compilation import COMPILE_MODES

    if set(compile) - {"on", *COMPILE_MODES}:
        _usage(f"--compile is on or one of {', '.join(COMPILE_MODES)}")
    if batch:
        args = (size, resolution, mode, steps, model, device, dtype, batch, method[0], preset)
        return _bench_batches(out, *args)
    with _reported_errors():
        results = speed.run(
            size,
            tuple(resolution),
            tuple(mode) if mode else speed.MODES,
            steps,
            model,
            device,
            dtype,
            tuple(method),
            log=_err,
            kv_banks=tuple(kv_bank),
            compiles=tuple(compile),
            on_row=lambda partial: speed.save(partial, out),
            preset=preset,
        )  # finished rows survive an interrupted run
    speed.save(results, out)
    typer.echo(speed.table(results))
    _err(f"wrote {out}")


def _bench_batches(
    out: Path, size, resolution, mode, steps, model, device, dtype, batch, method, preset
) -> None:
    """`bench speed --batch`: K edits of one source per loop, per K."""
    from dragonctl.bench import speed

    with _reported_errors():
        results = speed.run_batches(
            size,
            tuple(resolution),
            tuple(mode) if mode else speed.MODES,
            steps,
            model,
            device,
            dtype,
            tuple(batch),
            method,
            log=_err,
            on_row=lambda partial: speed.save(partial, out),
            preset=preset,
        )
    speed.save(results, out)
    typer.echo(speed.batch_table(results))
    _err(f"wrote {out}")


@bench_app.command("precision")
def bench_precision(
    size: str = typer.Option("tiny8", help="tiny8 (SD's VAE factor 8, CPU) or sd15 (random)."),
    resolution: list[int] = typer.Option([512, 768], help="Working resolutions (repeatable)."),
    mode: list[str] = typer.Option(["move"], help="Modes (repeatable)."),
    model: str | None = typer.Option(None, help="A real model instead of random weights."),
    device: str = typer.Option("auto"),
    edits: bool = typer.Option(False, "--edits", help="Also compare whole edits' effects."),
    out: Path = typer.Option(Path("runs/precision.json"), "--out", "-o", help="JSON results."),
) -> None:
    """fp16 against fp32 guidance: one guided step's gradient (cosine, norm), per resolution."""
    from dragonctl.bench import precision
    from dragonctl.files import atomic_write

    if size not in ("tiny8", "sd15"):
        _usage("--size is tiny8 or sd15")
    with _reported_errors():
        rows = precision.run(
            size, tuple(resolution), tuple(mode), model, device, edits=edits, log=_err
        )
    atomic_write(out, (json.dumps(rows, indent=2) + "\n").encode())
    _err(f"wrote {out}")


@bench_app.command("ray")
def bench_ray(
    workers: list[int] = typer.Option([1, 2], "--workers", help="Worker counts (repeatable)."),
    specs: int = typer.Option(8, min=1, help="Specs in the batch, one source each."),
    model: str = typer.Option("shapes", help="The model every spec uses."),
    steps: int = typer.Option(50, min=2, help="DDIM steps per edit."),
    cpus_per_worker: int = typer.Option(
        1, min=1, help="Cores (and threads) per worker without GPUs, the same at every count."
    ),
    out: Path = typer.Option(Path("runs/ray"), "--out", "-o", help="Folder for specs, results."),
) -> None:
    """Batch throughput on Ray: specs per minute for each worker count, beside a plain run, and
    the scaling efficiency. Joins RAY_ADDRESS, else starts a local runtime."""
    from dragonctl.bench import throughput
    from dragonctl.files import atomic_write

    _check_ray()
    with _reported_errors():
        rows = throughput.run(out, tuple(workers), specs, model, steps, cpus_per_worker, log=_err)
    atomic_write(out / "throughput.json", (json.dumps(rows, indent=2) + "\n").encode())
    _err(f"wrote {out / 'throughput.json'}")


@bench_app.command("convert-lpips")
def bench_convert_lpips(
    alexnet: Path = typer.Argument(..., help="torchvision's AlexNet weights (alexnet-owt-*.pth)."),
    lpips: Path = typer.Argument(..., help="The lpips package's linear heads (alex.pth)."),
    out: Path = typer.Argument(..., help="The safetensors file for --lpips-weights."),
) -> None:
    """Convert the published LPIPS (AlexNet) weights for `bench dragbench --lpips-weights`."""
    import pickle

    from dragonctl.bench.dragbench_metrics import convert_lpips

    try:
        convert_lpips(alexnet, lpips, out)
    except (OSError, KeyError, RuntimeError, pickle.UnpicklingError) as e:
        _err(f"error: {e}")
        raise typer.Exit(1) from None
    typer.echo(str(out))


@import_app.command("dragbench")
def import_dragbench(
    src: Path = typer.Argument(
        ..., help="DragBench folder: <category>/<sample>/ (converted or original layout)."
    ),
    out: Path = typer.Argument(
        ..., help="Where to write <category>/<sample>.yaml (may exist already)."
    ),
) -> None:
    """Turn each DragBench sample into one drag spec (prompt, mask, handle → target pairs)."""
    from dragonctl.dragbench_import import import_dragbench as do_import

    if not src.is_dir():
        _usage(f"{src} is not a folder")
    written, failed = do_import(src, out)
    for line in failed:
        _err(f"failed: {line}")
    _err(f"imported {len(written)} samples into {out}, {len(failed)} failed")
    if not written and not failed:
        _usage(f"no DragBench samples under {src}")
    raise typer.Exit(1 if failed else 0)


@bench_app.command("dragbench")
def bench_dragbench(
    specs_dir: Path = typer.Argument(..., help="Specs written by `dragonctl import dragbench`."),
    out: Path = typer.Option(Path("runs/dragbench"), "--out", "-o", help="Results folder."),
    model: str | None = typer.Option(None, help="Model for every sample (e.g. shapes)."),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
    steps: int | None = typer.Option(None, help="Override the number of steps (plumbing runs)."),
    resolution: int | None = typer.Option(
        None, help="Override the working resolution (plumbing runs)."
    ),
    limit: int | None = typer.Option(None, help="Only the first N specs."),
    dift_model: str | None = typer.Option(
        None, help="DIFT model for Mean Distance (the protocol uses SD 2.1)."
    ),
    lpips_weights: Path | None = typer.Option(
        None, help="LPIPS (AlexNet) weights, safetensors, for Image Fidelity."
    ),
) -> None:
    """Run imported DragBench specs; write results.json (seconds, peak memory, outputs) and the
    Mean Distance / Image Fidelity protocol's inputs (md_if_inputs.json)."""
    from dragonctl.bench.dragbench_run import run as run_bench

    with _reported_errors():
        rows, failed = run_bench(
            specs_dir,
            out,
            model,
            device,
            dtype,
            steps,
            limit,
            log=_err,
            dift_model=dift_model,
            lpips_weights=lpips_weights,
            resolution=resolution,
        )
    _err(f"{len(rows) - len(failed)} done, {len(failed)} failed; wrote {out / 'results.json'}")
    for r in failed:
        _err(f"failed: {r['spec']}: {r['error']}")
    raise typer.Exit(1 if failed else 0)


def main() -> None:
    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if "torch" not in sys.modules:
            raise
        _exit_without_teardown(code)


def _exit_without_teardown(code: int) -> None:
    """Exit as Python would, less its teardown of modules: with torch and diffusers loaded that
    teardown alone takes about a second, after every edit and after every Ctrl-C. Exit handlers
    still run (Ray's, logging's, multiprocessing's) and the streams are flushed; every file
    dragonctl writes is closed (and synced) before this point."""
    import atexit
    import threading

    main = threading.main_thread()
    if any(t is not main and not t.daemon for t in threading.enumerate()):
        sys.exit(code)  # a thread Python would wait for may still have work to finish
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
