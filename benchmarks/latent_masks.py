"""`python -m benchmarks.latent_masks any|nearest OUT [--cases N]`: the shapes quality bench with
latent masks by any coverage (dragonctl's) or by nearest subsampling (the reference's), to compare
the two (docs/lab-notebook.md, 2026-12-02)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dragonctl import geometry
from dragonctl.bench import quality


def nearest_latent(original):
    """`Grids.latent` by nearest subsampling: the cell's top-left pixel, as F.interpolate does."""

    def latent(self, mask: np.ndarray, touch: bool = True) -> np.ndarray:
        if not touch:
            return original(self, mask, touch)
        h, w = self.latent_hw
        m = mask[np.arange(h) * mask.shape[0] // h][:, np.arange(w) * mask.shape[1] // w]
        return m if m.any() or not mask.any() else original(self, mask, touch)

    return latent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", choices=["any", "nearest"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--cases", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.variant == "nearest":
        geometry.Grids.latent = nearest_latent(geometry.Grids.latent)
    summary = quality.run(args.out, cases=args.cases, log=lambda *_: None)
    print(json.dumps({m: s["median"] for m, s in summary["modes"].items()}, indent=1))


if __name__ == "__main__":
    main()
