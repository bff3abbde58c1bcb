"""Run imported DragBench specs in batch: per-sample seconds, peak memory, output path, and the
inputs of DragDiffusion's protocol (Mean Distance needs DIFT on SD 2.1, Image Fidelity needs LPIPS:
both need weights that are not available offline, so this writes what they consume rather than the
scores)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml

from dragonctl.bench.memory import peak_memory_mb


def run(
    specs_dir: Path,
    out: Path,
    model: str | None,
    device: str = "auto",
    dtype: str = "auto",
    steps: int | None = None,
    limit: int | None = None,
    log=print,
    dift_model: str | None = None,
    lpips_weights: Path | None = None,
    resolution: int | None = None,
    dift_resolution: int = 768,
) -> tuple[list[dict], list[dict]]:
    from dragonctl import api

    specs = sorted(specs_dir.rglob("*.yaml"))[:limit]
    rows: list[dict] = []
    inputs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {
            k: v for k, v in (("steps", steps), ("resolution", resolution)) if v is not None
        }
        original = {_with_overrides(spec, specs_dir, Path(tmp), overrides): spec for spec in specs}
        run_specs = list(original)
        opts = api.EditOptions(
            out_dir=out / "results",
            out_root=Path(tmp) if overrides else specs_dir,
            model=model,
            device=device,
            dtype=dtype,
        )

        def on_report(rep) -> None:
            row = {
                "spec": str(original.get(rep.path, rep.path)),
                "ok": rep.ok,
                "seconds": round(rep.seconds, 3),
                "peak_memory_mb": round(peak_memory_mb(), 1),
                "output": str(rep.output) if rep.output else None,
            }
            if not rep.ok:
                row["error"] = " | ".join(rep.errors)
            else:
                ls = api.load_spec(rep.path)
                inputs.append(
                    {
                        "sample": f"{rep.path.parent.name}/{rep.path.stem}",
                        "source": str(ls.resolve(ls.spec.image).resolve()),
                        "result": str(rep.output),
                        "handles": [p[0] for p in ls.spec.points or []],
                        "targets": [p[1] for p in ls.spec.points or []],
                        "prompt": ls.spec.prompt,
                    }
                )
            rows.append(row)
            log(f"{'ok ' if rep.ok else 'FAIL'} {rep.path} {rep.seconds:.1f} s")

        api.edit(run_specs, opts, None, on_report)
    if dift_model or lpips_weights:
        scores = protocol_scores(inputs, dift_model, lpips_weights, device, dtype, dift_resolution)
        for row in rows:
            row.update(scores.get(row["output"], {}))
        valid = [r for r in rows if "mean_distance" in r or "image_fidelity" in r]
        for key in ("mean_distance", "image_fidelity"):
            vals = [r[key] for r in valid if key in r]
            if vals:
                log(f"{key}: {sum(vals) / len(vals):.4f} over {len(vals)} samples")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "md_if_inputs.json").write_text(json.dumps(inputs, indent=2) + "\n")
    return rows, [r for r in rows if not r["ok"]]


def _with_overrides(spec: Path, specs_dir: Path, tmp: Path, overrides: dict) -> Path:
    """The spec itself, or with overrides a copy under tmp whose paths are absolute."""
    if not overrides:
        return spec
    data = yaml.safe_load(spec.read_text())
    for key in ("image", "mask"):
        data[key] = str((spec.parent / data[key]).resolve())
    data.update(overrides)
    copy = tmp / spec.relative_to(specs_dir)
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(yaml.safe_dump(data))
    return copy


def protocol_scores(
    inputs: list[dict],
    dift_model: str | None,
    lpips_weights: Path | None,
    device: str = "auto",
    dtype: str = "auto",
    resolution: int = 768,
) -> dict[str, dict]:
    """Mean Distance (with a DIFT model, e.g. SD 2.1) and Image Fidelity (with LPIPS weights) per
    output."""
    import numpy as np
    from PIL import Image

    from dragonctl.bench import dragbench_metrics as metrics
    from dragonctl.geometry import Frame, working_size

    bundle = lpips = None
    if dift_model:
        from dragonctl.models import load_bundle

        bundle = load_bundle(dift_model, device, dtype)
    if lpips_weights:
        lpips = metrics.LPIPS.from_file(lpips_weights)
    scores: dict[str, dict] = {}
    for rec in inputs:
        src = np.asarray(Image.open(rec["source"]).convert("RGB"))
        edited = np.asarray(Image.open(rec["result"]).convert("RGB"))
        row: dict = {}
        if bundle is not None:
            h, w = src.shape[:2]
            frame = Frame(h, w, *working_size(h, w, resolution, bundle.size_multiple))
            fs = metrics.dift_features(bundle, frame.image_to_work(src), rec["prompt"])
            fe = metrics.dift_features(bundle, frame.image_to_work(edited), rec["prompt"])
            moved = [(hnd, tgt) for hnd, tgt in zip(rec["handles"], rec["targets"])]
            row["mean_distance"] = (
                metrics.match_distance(
                    fs,
                    fe,
                    [tuple(frame.to_work(*p)) for p, _ in moved],
                    [tuple(frame.to_work(*q)) for _, q in moved],
                    (frame.work_h, frame.work_w),
                )
                / frame.sx
            )
        if lpips is not None:
            row["image_fidelity"] = metrics.image_fidelity(lpips, src, edited)
        scores[rec["result"]] = row
    return scores
