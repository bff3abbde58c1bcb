"""DDIM inversion: the source's latent trajectory L[0..n], the memory bank's backbone.

A plain function over a noise-prediction callable, so tests can feed it any ε model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dragonctl.schedules import Schedule, inversion_step

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]  # (z, timestep) → ε


def invert(
    eps_fn: EpsFn,
    z0: torch.Tensor,
    schedule: Schedule,
    progress: Callable[[], None] | None = None,
    refine: int = 0,
) -> torch.Tensor:
    """Return L with L[0] = z0 and L[k+1] = DDIM-up(L[k]); L[n-i] is at edit step i's noise level.

    Inversion step k uses edit step i = n-1-k's timestep; the memory bank reproduces its last UNet
    call at edit step i (the reference's alignment).

    Plain DDIM inversion evaluates ε at the less noisy latent, (L[k], t_i), while sampling evaluates
    it at the noisier one; `refine` > 0 re-evaluates ε at the new latent that many times (a
    fixed-point iteration), so sampling back retraces the trajectory more exactly, and the last
    call is at (≈ L[k+1], t_i), the generation's own. 0 is the reference method.
    """
    n = schedule.steps
    latents = [z0]
    z = z0
    for k in range(n):
        i = n - 1 - k
        t = schedule.timesteps[i]
        z_prev = z
        z = inversion_step(z_prev, eps_fn(z_prev, t), schedule.alpha[i], schedule.alpha_prev[i])
        for _ in range(refine):
            z = inversion_step(z_prev, eps_fn(z, t), schedule.alpha[i], schedule.alpha_prev[i])
        latents.append(z)
        if progress:
            progress()
    return torch.stack(latents)
