"""Batch throughput on Ray (`dragonctl bench ray`): specs per minute for 1, 2, … workers.

One batch of move specs, each on its own source (so every spec is a unit a worker can take), run
plainly in this process and then on Ray with each worker count. A run's time counts from the
call to its last written result: workers' start-up and model loading included, as a user pays
them; Ray's own start-up is not (the runtime is started once, before the first run). Scaling
efficiency is (rate with w workers / rate with 1) / w.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image


def make_batch(folder: Path, n: int, model: str, steps: int, size: int = 128) -> list[Path]:
    """n move specs, each moving the first shape of its own shapes-world scene."""
    from dragonctl.shapes.world import random_scene, render

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2024)
    specs = []
    for i in range(n):
        scene = random_scene(rng, size)
        shown = render(scene)
        Image.fromarray(shown.to_uint8()).save(folder / f"src{i}.png")
        ys, xs = np.nonzero(shown.masks[0])
        box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        dx = 12 if box[2] + 12 <= size else -12
        spec = {
            "version": 1,
            "image": f"src{i}.png",
            "mode": "move",
            "mask": {"box": box},
            "offset": [dx, 0],
            "model": model,
            "steps": steps,
        }
        path = folder / f"s{i}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        specs.append(path)
    return specs


def run(
    out_dir: Path,
    workers: tuple[int, ...] = (1, 2),
    specs: int = 8,
    model: str = "shapes",
    steps: int = 50,
    cpus_per_worker: int | None = 1,
    log=print,
) -> list[dict]:
    """The plain run, then one Ray run per worker count; one row each. Without GPUs each worker
    gets `cpus_per_worker` cores (and threads) at every count, and the plain run as many threads,
    so the counts compare like with like."""
    import ray

    from dragonctl import api
    from dragonctl.cluster import connect
    from dragonctl.errors import DragonError

    batch = make_batch(out_dir / "specs", specs, model, steps)
    rows = []

    def timed(name: str, opts: api.EditOptions) -> None:
        t0 = time.perf_counter()
        reports = api.edit(batch, opts)
        seconds = time.perf_counter() - t0
        failed = [r for r in reports if not r.ok]
        if failed:
            raise DragonError(f"{name}: {failed[0].errors[0]}")
        row = {
            "run": name,
            "workers": opts.workers or 1,
            "specs": specs,
            "seconds": round(seconds, 1),
            "specs_per_min": round(60 * specs / seconds, 2),
            "workers_used": len({r.worker for r in reports}) if opts.ray else 1,
        }
        rows.append(row)
        log(json.dumps(row))

    plain = api.EditOptions(no_cache=True, out_dir=out_dir / "plain", threads=cpus_per_worker)
    timed("plain", plain)
    started = connect(None)
    try:
        for w in workers:
            opts = api.EditOptions(
                no_cache=True,
                out_dir=out_dir / f"ray{w}",
                ray=True,
                workers=w,
                cpus_per_worker=cpus_per_worker,
            )
            timed(f"ray, {w} worker{'s' if w > 1 else ''}", opts)
    finally:
        if started:
            ray.shutdown()
    one = next(
        (r["specs_per_min"] for r in rows if r["run"].startswith("ray") and r["workers"] == 1), None
    )
    for r in rows:
        if one and r["run"].startswith("ray"):
            r["efficiency"] = round(r["specs_per_min"] / one / r["workers"], 3)
    return rows
