"""`python -m benchmarks.shapes_loss FOLDER...`: held-out v-loss of shapes weights on each world.

The same 64 scenes per world (seed 20 000, never a training step's), the same timesteps (evenly
spread over the schedule) and the same noise for every folder, so exports compare on one figure
per world. A folder is a shapes model (`shapes` for the embedded one)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dragonctl.models import load_bundle
from dragonctl.shapes.train import unshuffle, v_loss
from dragonctl.shapes.world import batch

WORLDS = {"flat": dict(flat_share=1.0), "gradient": {}, "textured": dict(textured_share=1.0)}


def world_losses(folder: str, scenes: int = 64) -> dict[str, float]:
    from diffusers import DDPMScheduler

    from dragonctl.shapes.model import scheduler_config

    b = load_bundle(folder, "cpu", "fp32")
    null = b.encode_prompt
    config = {k: v for k, v in scheduler_config().items() if k != "set_alpha_to_one"}
    alphas = DDPMScheduler(**config).alphas_cumprod

    class Null:
        def __call__(self, n: int) -> torch.Tensor:
            return null([""]).expand(n, -1, -1)

    out = {}
    for name, kwargs in WORLDS.items():
        x = torch.from_numpy(batch(np.random.default_rng(20_000), scenes, 64, **kwargs))
        z0 = unshuffle(x)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.linspace(0, len(alphas) - 1, scenes).long()
        with torch.no_grad():
            out[name] = round(float(v_loss(b.unet, Null(), z0, noise, t, alphas)), 5)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("folders", nargs="+")
    args = ap.parse_args()
    for folder in args.folders:
        print(json.dumps({"model": str(Path(folder)), **world_losses(folder)}), flush=True)


if __name__ == "__main__":
    main()
