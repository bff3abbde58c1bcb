"""`python -m benchmarks.shapes_samples MODEL OUT`: what a shapes model has learnt, before any edit.

Writes `OUT/samples.png`: DDIM samples from seeded noise (seeds 0..n-1). A model that has learnt
the world draws crisp flat shapes on smooth backgrounds; look at the sheet. Used to follow the
SD-like model's training (docs/training.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dragonctl.engine import to_uint8
from dragonctl.models import load_bundle


@torch.no_grad()
def sample(model: str, n: int, steps: int, size: int) -> np.ndarray:
    """n DDIM samples (η = 0) from seeded noise, as one row of uint8 images."""
    from diffusers import DDIMScheduler

    b = load_bundle(model, device="cpu", dtype="fp32")
    sched = DDIMScheduler.from_config(b.scheduler_config)
    sched.set_timesteps(steps)
    side = size // b.latent_factor
    channels = b.unet.config.in_channels
    noise = [
        torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(k))
        for k in range(n)
    ]
    z = torch.cat(noise)
    context = b.encode_prompt([""] * n)
    for t in sched.timesteps:
        z = sched.step(b.unet(z, t, context).sample, t, z).prev_sample
    images = [to_uint8(b.decode_latent(z[k : k + 1])) for k in range(n)]
    return np.concatenate(images, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", help="shapes, or a shapes folder (training/shapes-v2)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=None, help="default: the model's own")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from dragonctl.bench.quality import case_size

    row = sample(args.model, args.n, args.steps, args.size or case_size(args.model))
    args.out.mkdir(parents=True, exist_ok=True)
    scale = max(1, 256 // row.shape[0])
    img = Image.fromarray(row)
    img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).save(
        args.out / "samples.png"
    )
    print(f"wrote {args.out / 'samples.png'}")


if __name__ == "__main__":
    main()
