"""DDIM inversion: the source's latent trajectory L[0..n], the memory bank's backbone.

A plain function over a noise-prediction callable, so tests can feed it any ε model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dragonctl.schedules import Schedule, inversion_step

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]  # (z, timestep) → ε


def invert(eps_fn: EpsFn, z0: torch.Tensor, schedule: Schedule,
           progress: Callable[[], None] | None = None) -> torch.Tensor:
    """Return L with L[0] = z0 and L[k+1] = DDIM-up(L[k]); L[n-i] is at edit step i's noise level.

    Inversion step k uses edit step i = n-1-k's timestep, so the UNet call at (L[k], t_i) is the one
    the memory bank reproduces at edit step i (the reference's alignment).
    """
    n = schedule.steps
    latents = [z0]
    z = z0
    for k in range(n):
        i = n - 1 - k
        eps = eps_fn(z, schedule.timesteps[i])
        z = inversion_step(z, eps, schedule.alpha[i], schedule.alpha_prev[i])
        latents.append(z)
        if progress:
            progress()
    return torch.stack(latents)
