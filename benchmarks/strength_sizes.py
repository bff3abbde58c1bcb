"""The guidance's strength across working sizes: one move on tiny random SD weights (VAE factor 8)
at several sizes, its effect on z0 and its first guided gradient per latent cell.

    python -m benchmarks.strength_sizes [--steps 6] [--energy 1.0] [--sizes 192 256 512 768]

"Effect": mean |z0 of the edit − z0 of the same edit at energy 0| (`bench.precision.edit_effect`).
`energy_scale` is meant to guide each feature cell equally at any size, so both columns should
agree across sizes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from dragonctl import api
from dragonctl.bench import precision
from dragonctl.bench.speed import write_specs
from dragonctl.bench.synthetic import save_sd_folder
from dragonctl.engine import Editor
from dragonctl.models import load_bundle


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--energy", type=float, default=1.0)
    ap.add_argument("--sizes", type=int, nargs="+", default=[192, 256, 512, 768])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = save_sd_folder(Path(tmp) / "tiny8", "tiny8", "epsilon")
        editor = Editor(load_bundle(str(model), "cpu", "fp32"))
        print("| size | effect | × 512² | first guided step: mean \\|gradient\\| | max |")
        print("|---|---|---|---|---|")
        rows = {}
        for res in args.sizes:
            folder = Path(tmp) / str(res)
            folder.mkdir()
            ls, inp = api.load(write_specs(folder, res, steps=args.steps, model=str(model))["move"])
            g = ls.spec.guidance.model_copy(update={"energy_scale": args.energy})
            spec = ls.spec.model_copy(
                update={"resolution": res, "max_resolution": res, "guidance": g}
            )
            grad = precision.guidance_gradient(editor, spec, inp, 0)
            rows[res] = (precision.edit_effect(editor, spec, inp), grad)
        base = rows.get(512, next(iter(rows.values())))[0]
        for res, (effect, grad) in rows.items():
            print(
                f"| {res}² | {effect:.4f} | {effect / base:.2f} | {float(grad.abs().mean()):.4f} "
                f"| {float(grad.abs().max()):.3f} |"
            )


if __name__ == "__main__":
    main()
