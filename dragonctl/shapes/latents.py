"""The UNet's training data for the SD-like shapes model: world scenes encoded by its VAE.

Encoding costs more than a UNet step on the CPU, so scenes are encoded once into a pool of shards
(`shard-NNNN.pt`, fp16 latents already multiplied by the VAE's scaling factor) under a folder
named after the VAE's weights: a retrained VAE gets a new pool. Shard k holds the scenes of
(seed, POOL_STREAM + k), so a pool rebuilt anywhere holds the same latents, and step k's batch is
drawn from it with (seed, k).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from dragonctl.shapes.model import V2_SIZE
from dragonctl.shapes.world import batch as world_batch

SHARD = 1024  # scenes per shard
POOL_STREAM = 1_000_000  # the shards' seeds, apart from the trainers' step seeds
HELD_OUT_SEED = 20_000  # scenes for the held-out loss, never in the pool
HELD_OUT_SCENES = 64


def load_vae(folder: Path, device: torch.device):
    from diffusers import AutoencoderKL

    from dragonctl.models import has_accelerate

    vae = AutoencoderKL.from_pretrained(
        folder, torch_dtype=torch.float32, low_cpu_mem_usage=has_accelerate()
    )
    return vae.to(device).eval()


def vae_tag(folder: Path) -> str:
    """What the latents depend on: the encoder's weights and the scaling factor (a decoder
    trained on alone keeps the pool)."""
    from safetensors.torch import load_file

    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    scaling = float(json.loads((folder / "config.json").read_text())["scaling_factor"])
    h = hashlib.sha256(scaling.hex().encode())
    for name in sorted(k for k in weights if k.startswith(("encoder.", "quant_conv."))):
        h.update(name.encode())
        h.update(weights[name].float().numpy().tobytes())
    return h.hexdigest()[:12]


@torch.no_grad()
def encode(vae, images: np.ndarray, device: torch.device, batch: int = 32) -> torch.Tensor:
    """Scaled latent means (n×4×h/8×w/8, fp32) of images in [-1, 1], as the bundle encodes."""
    from dragonctl.models import vae_codec

    to_latent = vae_codec(vae, device, torch.float32)[1]
    chunks = (torch.from_numpy(images[i : i + batch]) for i in range(0, len(images), batch))
    return torch.cat([to_latent(x).float().cpu() for x in chunks])


def build_pool(
    vae, folder: Path, seed: int, shards: int, device: torch.device, flat_share: float = 0.0
) -> torch.Tensor:
    """Encode the missing shards (each saved atomically, so an interrupted build resumes), then
    return the whole pool."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        path = folder / f"shard-{k:04d}.pt"
        if path.exists():
            continue
        rng = np.random.default_rng([seed, POOL_STREAM + k])
        images = world_batch(rng, SHARD, V2_SIZE, flat_share)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(encode(vae, images, device).half(), tmp)
        os.replace(tmp, path)
        print(f"latent pool: shard {k + 1}/{shards} encoded", flush=True)
    return torch.cat(
        [torch.load(folder / f"shard-{k:04d}.pt", weights_only=True) for k in range(shards)]
    )


def pool_batch(pool: torch.Tensor, seed: int, step: int, n: int) -> torch.Tensor:
    """Step `step`'s batch (fp32), drawn with (seed, step)."""
    idx = np.random.default_rng([seed, step]).integers(0, len(pool), n)
    return pool[torch.from_numpy(idx)].float()


def held_out(vae, device: torch.device) -> torch.Tensor:
    scenes = world_batch(np.random.default_rng(HELD_OUT_SEED), HELD_OUT_SCENES, V2_SIZE)
    return encode(vae, scenes, device)
