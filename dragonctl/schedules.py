"""DDIM arithmetic and the method's step windows, as plain functions of ᾱ values.

Edit step i = 0..n-1 runs at timestep t_i (descending); the inverted trajectory L[0..n] has L[n-i]
at the noise level of step i. Every prediction type is turned into ε first, so inversion, sampling
and guidance share one code path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    timesteps: list[int]  # t_i, descending
    alpha: list[float]  # ᾱ at t_i
    alpha_prev: list[float]  # ᾱ at the next-lower timestep (the final ᾱ after the last step)
    prediction_type: str

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @classmethod
    def from_config(cls, scheduler_config: dict, steps: int) -> Schedule:
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(scheduler_config)
        sched.set_timesteps(steps)
        ts = [int(t) for t in sched.timesteps]
        ac = sched.alphas_cumprod
        final = float(sched.final_alpha_cumprod)
        ratio = sched.config.num_train_timesteps // steps
        alpha = [float(ac[t]) for t in ts]
        alpha_prev = [float(ac[t - ratio]) if t - ratio >= 0 else final for t in ts]
        return cls(ts, alpha, alpha_prev, sched.config.prediction_type)


def to_eps(
    output: torch.Tensor, z: torch.Tensor, alpha: float, prediction_type: str
) -> torch.Tensor:
    """The model's output as a noise prediction ε, at noise level ᾱ = alpha."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha**0.5 * output + (1 - alpha) ** 0.5 * z
    if prediction_type == "sample":
        return (z - alpha**0.5 * output) / (1 - alpha) ** 0.5
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def predict_x0(z: torch.Tensor, eps: torch.Tensor, alpha: float) -> torch.Tensor:
    return (z - (1 - alpha) ** 0.5 * eps) / alpha**0.5


def ddim_step(
    z: torch.Tensor,
    eps: torch.Tensor,
    alpha: float,
    alpha_prev: float,
    eps_dir: torch.Tensor | None = None,
    sigma: torch.Tensor | float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM step down: x̂0 from `eps` (guided ε), the direction from `eps_dir` (unguided)."""
    x0 = predict_x0(z, eps, alpha)
    d = eps if eps_dir is None else eps_dir
    out = alpha_prev**0.5 * x0 + (1 - alpha_prev - sigma**2) ** 0.5 * d
    if noise is not None:
        out = out + sigma * noise
    return out


def inversion_step(
    z_prev: torch.Tensor, eps: torch.Tensor, alpha: float, alpha_prev: float
) -> torch.Tensor:
    """One DDIM step up (the exact inverse of `ddim_step` for the same ε)."""
    x0 = predict_x0(z_prev, eps, alpha_prev)
    return alpha**0.5 * x0 + (1 - alpha) ** 0.5 * eps


def ddim_variance(alpha: float, alpha_prev: float) -> float:
    return (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)


@dataclass(frozen=True)
class StepWindows:
    """The method's step windows as fractions of the schedule (0.6 of 50 steps = step 30)."""

    method: str  # dragondiffusion | diffeditor (sparser guidance, regional SDE, time travel)
    guided: bool  # any energy guidance at all (energy_scale > 0)
    guide_until: float
    dense_until: float
    inject_from: float
    inject_until: float
    sde_from: float
    sde_until: float
    time_travel_from: float
    time_travel_until: float
    time_travel_repeats: int
    image_prompt_from: float = 0.0  # DiffEditor's image prompt: steps in [from, until)
    image_prompt_until: float = 0.0


@dataclass(frozen=True)
class StepPlan:
    """Which edit steps get guidance, K/V injection, regional SDE, time travel and the image
    prompt."""

    guided: frozenset[int]
    injected: frozenset[int]
    sde: frozenset[int]
    time_travel: frozenset[int]
    repeats: int
    image_prompt: frozenset[int] = frozenset()

    def passes(self, i: int) -> int:
        """How many times step i runs: time travel repeats it, re-noising in between."""
        return self.repeats if i in self.time_travel else 1

    @classmethod
    def build(cls, w: StepWindows, steps: int) -> StepPlan:
        def at(frac: float) -> int:
            return round(frac * steps)

        diffeditor = w.method == "diffeditor"
        guided = {
            i
            for i in range(at(w.guide_until))
            if w.guided and (not diffeditor or i < at(w.dense_until) or i % 2 == 0)
        }
        injected = {i for i in range(steps) if at(w.inject_from) <= i < at(w.inject_until)}
        sde = {i for i in range(steps) if diffeditor and at(w.sde_from) < i < at(w.sde_until)}
        in_travel = range(at(w.time_travel_from) + 1, at(w.time_travel_until))
        travel = {
            i for i in in_travel if diffeditor and w.guided and i % 2 == 0 and 0 <= i < steps - 1
        }
        prompted = range(at(w.image_prompt_from), at(w.image_prompt_until))
        return cls(
            frozenset(guided),
            frozenset(injected),
            frozenset(sde),
            frozenset(travel),
            w.time_travel_repeats,
            frozenset(i for i in prompted if i < steps),
        )

    @classmethod
    def none(cls) -> StepPlan:
        """No guidance, no injection: plain DDIM (the reconstruction baseline)."""
        return cls(frozenset(), frozenset(), frozenset(), frozenset(), 1)
