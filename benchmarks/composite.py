"""`python -m benchmarks.composite [PHOTO] [--long-side 8000] [--model shapes]`: a large photo.

Upscales PHOTO (default: a shapes-world scene) so its long side is `--long-side` pixels, moves a
box a tenth of the image to the right with the composite on and off, and prints per run: the PSNR
against the source far from the edit (farther than a fifth of the short side from the object's
box and its target: the shapes model works at 64², so its latent cells are 1/16 of the image), the
share of pixels the edit touched, the seconds of the composite step and of the whole edit, and the
process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dragonctl import api
from dragonctl.geometry import box_mask, dilate


def far_psnr(out: np.ndarray, src: np.ndarray, far: np.ndarray) -> float:
    mse = float(np.mean((out[far].astype(np.float64) - src[far]) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("photo", nargs="?", type=Path)
    ap.add_argument("--long-side", type=int, default=8000)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    if args.photo is not None:
        small = Image.open(args.photo).convert("RGB")
    else:
        from dragonctl.shapes.world import random_scene, render

        small = Image.fromarray(render(random_scene(np.random.default_rng(7), 128)).to_uint8())
    k = args.long_side / max(small.size)
    w, h = round(small.width * k), round(small.height * k)
    photo = np.asarray(small.resize((w, h), Image.Resampling.LANCZOS))
    box = [0.3 * w, 0.35 * h, 0.45 * w, 0.55 * h]
    dx = 0.1 * w
    edit_region = box_mask(box, h, w) | box_mask([box[0] + dx, box[1], box[2] + dx, box[3]], h, w)
    far = ~dilate(edit_region, min(h, w) // 5)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        Image.fromarray(photo).save(folder / "photo.png", compress_level=1)
        spec = folder / "move.yaml"
        spec.write_text(
            f"version: 1\nimage: photo.png\nmode: move\nmodel: {args.model}\n"
            f"steps: {args.steps}\nmask: {{box: {[round(v) for v in box]}}}\noffset: [{dx}, 0]\n"
        )
        for composite in (True, False):
            out = folder / ("on" if composite else "off")
            opts = api.EditOptions(out_dir=out, no_cache=True, composite=composite)
            t0 = time.perf_counter()
            rep = api.edit([spec], opts)[0]
            seconds = time.perf_counter() - t0
            assert rep.ok, rep.errors
            result = np.asarray(Image.open(out / "move.png"))
            meta = json.loads((out / "move.json").read_text())
            row = {
                "size": f"{w}x{h}",
                "composite": composite,
                "far_psnr_db": far_psnr(result, photo, far),
                "far_share": round(float(far.mean()), 3),
                "edited_fraction": meta["stats"]["edited_fraction"],
                "composite_s": round(meta["timings"]["composite_s"], 2),
                "edit_s": round(seconds, 1),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            }
            print(json.dumps(row))


if __name__ == "__main__":
    main()
