"""The README's first edit and a batch of the five samples, as whole processes, side by side with
an older checkout (`--baseline DIR`), on one thread from an empty cache.

    python -m benchmarks.first_edit --baseline /tmp/base --runs 3

Prints each run's wall time and, from the sidecars, where the time went: inversion and editing
(the loop, its guided steps included) inside the edit, and "outside" (process start, imports,
model load, reading and writing) as the wall time less the edit's own `total_s`. Alternates the
two checkouts run by run, so a change of machine load affects both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(checkout: Path | None, target: str) -> tuple[float, list[dict]]:
    """Wall seconds of `dragonctl edit target` and the sidecars it wrote."""
    root = checkout or REPO
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "dragonctl", "edit", str(root / target)]
        cmd += ["--no-cache", "--threads", "1", "--out", out]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        records = [json.loads(p.read_text()) for p in sorted(Path(out).rglob("*.json"))]
    return wall, records


def imports(checkout: Path | None, module: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], env=env, check=True)
    return time.perf_counter() - t0


def row(name: str, walls: list[float], records: list[list[dict]]) -> str:
    med = statistics.median(walls)
    total = statistics.median(sum(r["timings"]["total_s"] for r in recs) for recs in records)
    inv = statistics.median(sum(r["timings"]["inversion_s"] for r in recs) for recs in records)
    edit = statistics.median(sum(r["timings"]["editing_s"] for r in recs) for recs in records)
    fwd = sum(r["stats"]["unet_forward"] for r in records[0])
    bwd = sum(r["stats"]["unet_backward"] for r in records[0])
    walls_s = " / ".join(f"{w:.1f}" for w in walls)
    return (
        f"| {name} | {walls_s} | **{med:.1f}** | {inv:.1f} | {edit:.1f} | {med - total:.1f} "
        f"| {fwd} / {bwd} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", type=Path, help="an older checkout to run beside this one")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-runs", type=int, default=1)
    args = ap.parse_args()
    sides = [("this checkout", None)] + ([("baseline", args.baseline)] if args.baseline else [])
    print(
        "| run | wall s, each run | median | inversion s | editing s | outside s "
        "| loop UNet forwards / backwards |"
    )
    print("|---|---|---|---|---|---|---|")
    for target, runs in (("samples/move.yaml", args.runs), ("samples", args.batch_runs)):
        results: dict[str, tuple[list[float], list[list[dict]]]] = {n: ([], []) for n, _ in sides}
        for _ in range(runs):
            for name, checkout in sides:
                wall, recs = run(checkout, target)
                results[name][0].append(wall)
                results[name][1].append(recs)
        for name, _ in sides:
            print(row(f"{target}, {name}", *results[name]))
        sys.stdout.flush()
    for module in ("torch", "diffusers.models.unets.unet_2d_condition"):
        print(f"import {module}: {imports(None, module):.1f} s (a process of its own)")


if __name__ == "__main__":
    main()
