"""Run imported DragBench specs in batch: per-sample seconds, peak memory, output path, and the inputs
of DragDiffusion's protocol (Mean Distance needs DIFT on SD 2.1, Image Fidelity needs LPIPS: both need
weights that are not available offline, so this writes what they consume rather than the scores)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml

from dragonctl.dragbench import peak_memory_mb


def run(specs_dir: Path, out: Path, model: str | None, device: str = "auto", dtype: str = "auto",
        steps: int | None = None, limit: int | None = None, log=print) -> tuple[list[dict], list[dict]]:
    from dragonctl import api

    specs = sorted(specs_dir.rglob("*.yaml"))[:limit]
    rows: list[dict] = []
    inputs: list[dict] = []
    original: dict[Path, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        run_specs = []
        for spec in specs:
            if steps is None:
                run_specs.append(spec)
                original[spec] = spec
                continue
            # a copy with fewer steps, paths made absolute so it can live elsewhere
            data = yaml.safe_load(spec.read_text())
            for key in ("image", "mask"):
                data[key] = str((spec.parent / data[key]).resolve())
            data["steps"] = steps
            copy = Path(tmp) / spec.relative_to(specs_dir)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(yaml.safe_dump(data))
            run_specs.append(copy)
            original[copy] = spec
        opts = api.EditOptions(out_dir=out / "results", out_root=Path(tmp) if steps is not None else specs_dir,
                               model=model, device=device, dtype=dtype)

        def on_report(rep) -> None:
            row = {"spec": str(original.get(rep.path, rep.path)), "ok": rep.ok, "seconds": round(rep.seconds, 3),
                   "peak_memory_mb": round(peak_memory_mb(), 1), "output": str(rep.output) if rep.output else None}
            if not rep.ok:
                row["error"] = " | ".join(rep.errors)
            else:
                ls = api.load_spec(rep.path)
                inputs.append({"sample": f"{rep.path.parent.name}/{rep.path.stem}",
                               "source": str(ls.resolve(ls.spec.image).resolve()),
                               "result": str(rep.output), "handles": [p[0] for p in ls.spec.points or []],
                               "targets": [p[1] for p in ls.spec.points or []], "prompt": ls.spec.prompt})
            rows.append(row)
            log(f"{'ok ' if rep.ok else 'FAIL'} {rep.path} {rep.seconds:.1f} s")

        api.edit(run_specs, opts, None, on_report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "md_if_inputs.json").write_text(json.dumps(inputs, indent=2) + "\n")
    return rows, [r for r in rows if not r["ok"]]
