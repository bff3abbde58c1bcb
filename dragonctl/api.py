"""The Python API the CLI wraps and tests call: validate, edit, invert, preview, init.

Nothing here parses arguments or prints; results come back as records, failures as `DragonError`s.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dragonctl.errors import DragonError, EditInterrupted, SpecError
from dragonctl.inputs import EditInputs, load_inputs, paste_target
from dragonctl.spec import MODES, LoadedSpec, load_spec  # noqa: F401  (load_spec is part of the API)

Progress = Callable[[str, int, int], None]


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

    def as_json(self) -> dict:
        return {"spec": str(self.path), "ok": self.ok, "errors": self.errors, "warnings": self.warnings,
                "output": str(self.output) if self.output else None, "seconds": round(self.seconds, 3),
                "skipped": self.skipped, "inversions": self.inversions}


# --- finding specs -----------------------------------------------------------------------------


def expand_specs(items: Iterable[str | Path]) -> list[Path]:
    """Spec files from paths, directories (searched recursively for *.yaml) and globs, in order, once each."""
    import glob

    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.rglob("*.yaml"))
        elif any(ch in str(item) for ch in "*?["):
            found = sorted(Path(x) for x in glob.glob(str(item), recursive=True))
        else:
            found = [p]
        for f in found:
            if f.resolve() not in {o.resolve() for o in out}:
                out.append(f)
    return out


def load(path: Path, model: str | None = None, seed: int | None = None) -> tuple[LoadedSpec, EditInputs]:
    ls = load_spec(path, model=model, seed=seed)
    return ls, load_inputs(ls)


def validate(paths: Iterable[str | Path], model: str | None = None) -> list[SpecReport]:
    reports = []
    for p in expand_specs(paths):
        try:
            _, inp = load(p, model=model)
            reports.append(SpecReport(p, True, warnings=inp.warnings))
        except SpecError as e:
            reports.append(SpecReport(p, False, errors=[str(x) for x in e.problems]))
    return reports


# --- output paths ------------------------------------------------------------------------------


def output_path(ls: LoadedSpec, out_dir: Path | None, common_root: Path | None) -> Path:
    """`--out DIR` mirrors the spec's path under the specs' common folder; else `output:`; else beside it."""
    if out_dir is not None:
        root = common_root or ls.path.parent
        rel = ls.path.resolve().relative_to(root.resolve()) if common_root else Path(ls.path.name)
        return out_dir / rel.with_suffix(".png")
    if ls.spec.output:
        return ls.resolve(ls.spec.output)
    return ls.path.with_name(ls.path.stem + ".edited.png")


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
    return {p.resolve() for p in paths}


# --- editing -----------------------------------------------------------------------------------


@dataclass
class EditOptions:
    out_dir: Path | None = None
    out_root: Path | None = None  # with out_dir: mirror spec paths relative to this (default: their common folder)
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int | None = None
    cache_dir: Path | None = None
    no_cache: bool = False
    local_files_only: bool = False
    allow_pickle: bool = False
    metadata: bool = True
    save_preview: bool = False
    skip_existing: bool = False
    compile: str = "off"  # off | on | a torch.compile mode: the step loop's UNet forward


class Session:
    """Loads each model once and keeps one `Editor` per model across a batch."""

    def __init__(self, opts: EditOptions) -> None:
        self.opts = opts
        self._editors: dict[str, object] = {}

    def editor(self, model: str):
        if model not in self._editors:
            from dragonctl.cache import TrajectoryCache
            from dragonctl.engine import Editor
            from dragonctl.models import load_bundle, resolve_compile

            bundle = load_bundle(model, self.opts.device, self.opts.dtype, self.opts.local_files_only,
                                 self.opts.allow_pickle)
            cache = TrajectoryCache(self.opts.cache_dir, enabled=not self.opts.no_cache)
            self._editors[model] = Editor(bundle, cache, compile=resolve_compile(self.opts.compile, bundle.device))
        return self._editors[model]


def edit(paths: Iterable[str | Path], opts: EditOptions | None = None, progress: Progress | None = None,
         on_report: Callable[[SpecReport], None] | None = None, stop: Callable[[], bool] | None = None
         ) -> list[SpecReport]:
    """Edit every spec; a failing spec is reported and the batch goes on.

    Specs are checked first (all of them, inputs fully decoded, before any model loads; the decoded
    images are not kept, so a batch of thousands stays small); two specs that would write one file
    are refused. Then they run grouped by model and source, so each source is inverted once.
    `stop()` is polled after every sampler step: when it turns true the current edit is abandoned
    (nothing written) and the remaining specs are reported as not run.
    """
    opts = opts or EditOptions()
    specs = expand_specs(paths)
    root = (opts.out_root or common_folder(specs)) if opts.out_dir is not None else None
    jobs: list[tuple[Path, LoadedSpec | None, Path | None, list[str]]] = []
    for p in specs:
        try:
            ls, _inp = load(p, model=opts.model, seed=opts.seed)
            jobs.append((p, ls, output_path(ls, opts.out_dir, root), []))
        except SpecError as e:
            jobs.append((p, None, None, [str(x) for x in e.problems]))
    seen: dict[Path, Path] = {}
    for p, _ls, out, _err in jobs:
        if out is not None:
            if out.resolve() in seen:
                raise DragonError(f"{p}: output {out} is also the output of {seen[out.resolve()]}; give one of them "
                                  "another `output:` or use --out")
            seen[out.resolve()] = p
    devices = [d.strip() for d in opts.device.split(",") if d.strip()]
    if len(devices) > 1:
        return _edit_on_devices(jobs, opts, devices, on_report)

    def group(k: int) -> tuple[str, str]:
        ls = jobs[k][1]
        return (ls.spec.model, str(ls.resolve(ls.spec.image).resolve())) if ls else ("", "")

    session = Session(opts)
    by_index: dict[int, SpecReport] = {}
    interrupted = False
    for k in sorted(range(len(jobs)), key=group):
        p, ls, out, errors = jobs[k]
        if errors or ls is None or out is None:
            rep = SpecReport(p, False, errors=errors)
        elif interrupted:
            rep = SpecReport(p, False, errors=[f"{p}: not run (interrupted)"], output=out)
        else:
            try:
                inp = load_inputs(ls)  # decoded again: a file changed since the check fails cleanly here
            except SpecError as e:
                rep = SpecReport(p, False, errors=[str(x) for x in e.problems])
            else:
                rep = edit_one(session, ls, inp, out, opts, progress, stop)
                interrupted = rep.interrupted
        by_index[k] = rep
        if on_report:
            on_report(rep)
    return [by_index[k] for k in range(len(jobs))]


def _device_worker(paths: list[str], opts: EditOptions) -> list[SpecReport]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return edit(paths, opts)


def _edit_on_devices(jobs, opts: EditOptions, devices: list[str], on_report) -> list[SpecReport]:
    """One worker process per device; whole source groups go to one device, largest groups first."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from dataclasses import replace

    groups: dict[tuple[str, str], list[int]] = {}
    reports: dict[int, SpecReport] = {}
    for k, (p, ls, _out, errors) in enumerate(jobs):
        if errors or ls is None:
            reports[k] = SpecReport(p, False, errors=errors)
            continue
        groups.setdefault((ls.spec.model, str(ls.resolve(ls.spec.image).resolve())), []).append(k)
    load = {d: 0 for d in devices}
    assigned: dict[str, list[int]] = {d: [] for d in devices}
    for idxs in sorted(groups.values(), key=len, reverse=True):
        d = min(devices, key=lambda x: load[x])
        assigned[d] += idxs
        load[d] += len(idxs)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(devices), mp_context=ctx) as pool:
        futures = {d: pool.submit(_device_worker, [str(jobs[k][0]) for k in idxs],
                                  replace(opts, device=d, out_root=opts.out_root or (
                                      common_folder([j[0] for j in jobs]) if opts.out_dir else None)))
                   for d, idxs in assigned.items() if idxs}
        for d, fut in futures.items():
            for k, rep in zip(assigned[d], fut.result()):
                reports[k] = rep
    out = [reports[k] for k in range(len(jobs))]
    if on_report:
        for rep in out:
            on_report(rep)
    return out


def edit_one(session: Session, ls: LoadedSpec, inp: EditInputs, out: Path, opts: EditOptions,
              progress: Progress | None, stop: Callable[[], bool] | None = None) -> SpecReport:
    from dragonctl import outputs

    t0 = time.perf_counter()
    rep = SpecReport(ls.path, False, warnings=list(inp.warnings), output=out)
    if out.resolve() in protected_paths(ls):
        rep.errors.append(f"{ls.path}: output: {out} is one of the spec's inputs; refusing to overwrite it")
        return rep
    if opts.skip_existing and out.exists():
        rec = outputs.read_record(out)
        if rec is not None and rec.get("spec") == ls.spec.model_dump(mode="json"):
            rep.ok, rep.skipped = True, True
            return rep
    try:
        editor = session.editor(ls.spec.model)
        result = editor.edit(ls.spec, inp, progress, stop)
        record = None
        if opts.metadata:
            record = outputs.metadata_record(ls.spec, ls.path, editor.bundle.identity, result.timings,
                                             {"stats": {"unet_forward": result.stats.unet_forward,
                                                        "unet_backward": result.stats.unet_backward,
                                                        "inversions": result.inversions}})
        outputs.write_result(out, result.image, ls.spec if opts.metadata else None, record, editor.bundle.name)
        if opts.save_preview:
            _write_previews(ls, inp, result.image, out)
        rep.ok = True
        rep.inversions = result.inversions
        rep.warnings += editor.cache.warnings
        editor.cache.warnings.clear()
    except EditInterrupted as e:
        rep.errors.append(f"{ls.path}: {e}; nothing written")
        rep.interrupted = True
    except DragonError as e:
        rep.errors.append(f"{ls.path}: {e}")
    except (FloatingPointError, RuntimeError, ValueError) as e:
        rep.errors.append(f"{ls.path}: edit failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    except OSError as e:
        rep.errors.append(f"{ls.path}: output: cannot write {out}: {e.strerror or e}")
    rep.seconds = time.perf_counter() - t0
    return rep


def _write_previews(ls: LoadedSpec, inp: EditInputs, result: np.ndarray, out: Path) -> None:
    from dragonctl import outputs

    outputs.write_result(out.with_name(out.stem + ".overlay.png"), preview_image(ls, inp))
    outputs.write_result(out.with_name(out.stem + ".compare.png"), outputs.side_by_side(inp.source, result))


# --- invert, preview, init ---------------------------------------------------------------------


def invert(paths: Iterable[str | Path], opts: EditOptions | None = None, progress: Progress | None = None
           ) -> list[SpecReport]:
    """Fill the cache with each spec's source inversion (and its placed reference's)."""
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
            plan = build_plan(ls.spec, inp, frame, ed.bundle.latent_factor)  # for the placed reference only
            ed.memory_bank(ls.spec, inp, frame.image_to_work(inp.source), plan.reference_work, schedule, progress)
            reports.append(SpecReport(p, True, seconds=time.perf_counter() - t0, inversions=ed.inversions - before))
        except SpecError as e:
            reports.append(SpecReport(p, False, errors=[str(x) for x in e.problems]))
        except DragonError as e:
            reports.append(SpecReport(p, False, errors=[f"{p}: {e}"]))
    return reports


def preview_image(ls: LoadedSpec, inp: EditInputs) -> np.ndarray:
    from dragonctl import outputs

    s = ls.spec
    img = outputs.overlay(inp.source, inp.mask if s.mode != "drag" else None, (230, 60, 60))
    if s.mode == "drag" and inp.mask is not None and not inp.mask.all():
        img = outputs.overlay(img, inp.mask, (60, 160, 230), 0.25)
    if inp.fill_region is not None:
        img = outputs.overlay(img, inp.fill_region, (240, 200, 40), 0.3)
    if inp.target_mask is not None:
        img = outputs.overlay(img, inp.target_mask, (60, 220, 90), 0.45)
    if s.mode in ("move", "resize") and inp.mask is not None:
        from dragonctl.geometry import bbox_center

        cx, cy = bbox_center(inp.mask)
        dx, dy = s.offset or (0.0, 0.0)
        img = outputs.draw_arrows(img, [((cx, cy), (cx + dx, cy + dy))])
    if s.mode == "drag":
        img = outputs.draw_arrows(img, inp.points)
    panels = [img]
    if inp.reference is not None and inp.reference_mask is not None:
        panels.append(outputs.overlay(inp.reference, inp.reference_mask, (230, 60, 60)))
        if s.mode == "paste" and s.at is not None:
            panels[0] = outputs.overlay(panels[0], paste_target(inp.reference_mask, s.effective_scale, tuple(s.at),
                                                                inp.source.shape[:2]), (60, 220, 90))
    return outputs.side_by_side(*panels)


def preview(path: str | Path, out: Path | None = None) -> Path:
    from dragonctl import outputs

    ls, inp = load(Path(path))
    out = out or ls.path.with_name(ls.path.stem + ".preview.png")
    if out.resolve() in protected_paths(ls):
        raise DragonError(f"{ls.path}: preview output {out} is one of the spec's inputs")
    outputs.write_result(out, preview_image(ls, inp))
    return out


STARTERS = {
    "move": "mask: {box: [X0, Y0, X1, Y1]}   # the object, in source pixels (or a PNG: mask: object.png)\n"
            "offset: [40, 0]                # move it 40 px right (dx, dy)\n"
            "# scale: 1.0                   # optional: resize while moving\n",
    "resize": "mask: {box: [X0, Y0, X1, Y1]}   # the object\nscale: 1.3                      # about the object's centre\n",
    "drag": "mask: {box: [X0, Y0, X1, Y1]}   # the editable region (omit: the whole image)\n"
            "points:                        # handle → target pairs, source pixels\n  - [[HX, HY], [TX, TY]]\n",
    "appearance": "mask: {box: [X0, Y0, X1, Y1]}   # the object to restyle\n"
                  "reference:\n  image: reference.png\n  mask: {box: [X0, Y0, X1, Y1]}   # the object to take the look from\n"
                  "  prompt: \"\"\n",
    "paste": "reference:\n  image: reference.png\n  mask: {box: [X0, Y0, X1, Y1]}   # the object to paste\n  prompt: \"\"\n"
             "at: [X, Y]                      # where its centre lands in the source\n# scale: 1.0\n",
}


def init_spec(mode: str, image: str, width: int | None = None, height: int | None = None) -> str:
    if mode not in MODES:
        raise DragonError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    body = STARTERS[mode]
    if width and height:
        body = (body.replace("X0", str(width // 4)).replace("Y0", str(height // 4)).replace("X1", str(width // 2))
                .replace("Y1", str(height // 2)).replace("HX", str(width // 3)).replace("HY", str(height // 2))
                .replace("TX", str(width // 2)).replace("TY", str(height // 2))
                .replace("[X, Y]", f"[{width // 2}, {height // 2}]"))
    return (f"# dragonctl edit spec ({mode}). Check it with `dragonctl validate` and `dragonctl preview`.\n"
            "version: 1\n"
            f"image: {image}              # relative to this file\n"
            f"mode: {mode}\n"
            "prompt: \"\"                    # describe the image (SD models); the shapes model ignores it\n"
            f"{body}"
            "# model: shapes                # default: Stable Diffusion 1.5; `shapes` runs offline\n"
            "# seed: 42\n# steps: 50\n# output: result.png\n"
            "# guidance: {method: dragondiffusion, energy_scale: 1.0, cfg_scale: 4.0}\n")
