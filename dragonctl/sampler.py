"""The guided edit loop: two branches, classifier-free guidance, energy guidance, SDE, time travel.

Guidance branch: the inverted trajectories (the memory bank). Generation branch: starts from the
mode's initial latent and, at each step, (1) runs the UNet with the bank rows in the same batch so
decoder self-attention reads the bank's K/V, (2) on guided steps adds the regional energy gradient
to ε, (3) takes a DDIM step (with DiffEditor's regional SDE in its window), (4) in the time-travel
window repeats the step after re-noising. Latents are fp32; the UNet runs in the bundle's dtype.

The parts, in the order `guided_edit` uses them: `UNetCalls` (the model calls, counted),
`Prompts` (every context batch), `MemoryBank` (the guidance branch), `EnergyGuidance` (the energy
gradient), `RegionalSDE` (DiffEditor's stochastic steps), and the step functions `guided_eps`,
`renoise`. None of them reads the spec: settings arrive as plain values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from dragonctl.attention import BankAttention, BankState, ImagePromptState
from dragonctl.errors import EditDiverged
from dragonctl.features import FeatureForward, to_grid
from dragonctl.schedules import (
    Schedule,
    StepPlan,
    ddim_step,
    ddim_variance,
    inversion_step,
    to_eps,
)

ENERGY_UNIT = 1000.0  # the reference's energy scale is its slider value × 1000
UNetForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Features = list[torch.Tensor]
Energy = Callable[[Features, list[Features]], torch.Tensor]  # (edited, [bank image's]) → scalar


@dataclass(frozen=True)
class GuidanceSettings:
    """The loop's settings, as plain values (the engine builds them from a spec once)."""

    cfg_scale: float
    # the energy gradient's factor: λ · 1000 · energy_scale (the reference's), times the working
    # grid's cells over those of the size energy_scale was tuned at (the same guidance per cell)
    energy_gain: float
    sde_strength: float  # DiffEditor's SDE inside the edit region ...
    sde_strength_outside: float  # ... and outside it

    @property
    def cfg(self) -> bool:
        return self.cfg_scale != 1.0


@dataclass(frozen=True)
class LoopPlan:
    """What the loop needs from a mode's plan (see `dragonctl.modes.EditPlan`)."""

    attention: BankAttention | None  # how the generation rows read the bank
    edit_mask: torch.Tensor  # latent h×w bool: where the edit gradient applies (content elsewhere)
    sde_mask: torch.Tensor  # latent h×w bool: where the SDE uses the inside strength
    edit_energy: Energy
    content_energy: Energy
    init_latent: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (z_T src, z_T 2nd)
    latent_hw: tuple[int, int]
    feature_hw: tuple[int, int]


@dataclass
class SamplerStats:
    unet_forward: int = 0  # UNet calls (any batch size; truncated feature forwards included)
    unet_backward: int = 0
    guided_steps: int = 0
    sde_steps: int = 0  # DiffEditor's stochastic steps taken (passes)
    image_prompt_steps: int = 0  # generation forwards that read the image prompt
    forward_rows: list[int] = field(default_factory=list)  # batch rows of each full forward
    feature_rows: list[int] = field(default_factory=list)  # ... of each truncated forward
    backward_rows: list[int] = field(default_factory=list)  # ... of each backward
    stored_kv_bytes: int = 0  # with recorded K/V: the memory they take

    @property
    def unet_row_passes(self) -> int:
        """Batch rows of every UNet call of the editing loop, forward and backward alike: the
        work an edit costs whatever its batching."""
        return sum(self.forward_rows) + sum(self.feature_rows) + sum(self.backward_rows)

    energies: list[tuple[int, float, float]] = field(default_factory=list)  # (step, edit, content)


class UNetCalls:
    """The UNet calls of one edit, counted: full forwards (no grad) and the guided steps'
    truncated forwards, at edit step i's timestep (the timesteps go to the device once: a
    Python int per call would be a host→device copy per call)."""

    def __init__(
        self,
        forward: UNetForward,
        features: FeatureForward,
        dtype: torch.dtype,
        prediction_type: str,
        schedule: Schedule,
        device: torch.device,
    ) -> None:
        self._forward, self._features = forward, features
        self.dtype, self.prediction_type, self.schedule = dtype, prediction_type, schedule
        self.timesteps = torch.tensor(schedule.timesteps, device=device)
        self.stats = SamplerStats()

    def output(self, z: torch.Tensor, i: int, context: torch.Tensor) -> torch.Tensor:
        """The UNet's raw output (fp32) at step i's timestep."""
        self.stats.unet_forward += 1
        self.stats.forward_rows.append(z.shape[0])
        with torch.no_grad():
            return self._forward(z, self.timesteps[i], context)

    def features(
        self, z: torch.Tensor, i: int, context: torch.Tensor, grid_hw: tuple[int, int]
    ) -> Features:
        """The feature stages on the common grid, fp32 (to_grid copies them out of a compiled
        call's buffers before the next call)."""
        self.stats.unet_forward += 1
        self.stats.feature_rows.append(z.shape[0])
        return to_grid(self._features(z.to(self.dtype), self.timesteps[i], context), grid_hw)

    def eps(self, output: torch.Tensor, z: torch.Tensor, alpha: float) -> torch.Tensor:
        return to_eps(output, z, alpha, self.prediction_type)


@dataclass(frozen=True)
class Prompts:
    """Every context batch the loop uses, built once per edit rather than once per step."""

    bank: torch.Tensor  # one row per bank image
    # the bank images' guidance features read the source's prompt, as the reference's estimator
    # does (the bank rows themselves keep each image's own, as its inversion had)
    bank_features: torch.Tensor
    generation: torch.Tensor  # [unconditional, source] with CFG, else [source]
    bank_and_generation: torch.Tensor
    source: torch.Tensor  # the source's prompt: also the generation's
    source_pair: torch.Tensor  # the guided step's two copies of the edited latent

    @classmethod
    def build(cls, bank: list[torch.Tensor], uncond: torch.Tensor, cfg: bool) -> Prompts:
        source = bank[0]
        generation = torch.cat([uncond, source]) if cfg else source
        bank_ctx = torch.cat(bank)
        return cls(
            bank_ctx,
            source.expand(len(bank), -1, -1),
            generation,
            torch.cat([bank_ctx, generation]),
            source,
            source.expand(2, -1, -1),
        )


@dataclass(frozen=True)
class ImagePromptRows:
    """The image prompt in the loop: the generation rows' image tokens ([unconditional, image]
    with CFG) and their scale, handed to the cross-attention processors through `state`."""

    state: ImagePromptState
    tokens: torch.Tensor
    scale: float


class MemoryBank:
    """The guidance branch: each bank image's inverted trajectory L[0..n] (source first), read by
    the generation rows' decoder self-attention through `state`.

    With `stored_kv` the bank's K/V are recorded in one pass before the loop and read back, with
    no bank rows in the step's batch; otherwise the bank rows run in every injected step's batch.
    """

    def __init__(
        self, trajectories: list[torch.Tensor], state: BankState, stored_kv: bool = False
    ) -> None:
        self.trajectories, self.state = trajectories, state
        self.size = len(trajectories)
        self.n = trajectories[0].shape[0] - 1
        self.stored: dict | None = {} if stored_kv else None

    def noise(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z_T of the source and of the second image (None for one-image modes)."""
        return self.trajectories[0][self.n], (
            self.trajectories[1][self.n] if self.size > 1 else None
        )

    def injected_rows(self, i: int) -> torch.Tensor:
        """The latents whose forward at step i's timestep reproduces the inversion's (L[n-1-i])."""
        return torch.cat([b[self.n - 1 - i] for b in self.trajectories])

    def rows_at(self, i: int) -> torch.Tensor:
        """The latents at step i's noise level (L[n-i]): the energies' references."""
        return torch.cat([b[self.n - i] for b in self.trajectories])

    def prepare(
        self,
        calls: UNetCalls,
        prompts: Prompts,
        attention: BankAttention | None,
        latent_hw: tuple[int, int],
        injected: Iterable[int],
    ) -> None:
        """Configure the attention for this edit; record the K/V of every injected step when
        they are stored."""
        self.state.configure(attention, latent_hw, calls.timesteps.device, self.stored)
        if self.stored is None:
            return
        for i in sorted(injected):
            with self.state.recording(self.stored, i):
                calls.output(self.injected_rows(i), i, prompts.bank)
        calls.stats.stored_kv_bytes = sum(
            k.numel() * k.element_size() * 2 for k, _v in self.stored.values()
        )

    def bank_rows(self, i: int) -> torch.Tensor | None:
        """The rows to put before the generation rows at injected step i (None when stored)."""
        return None if self.stored is not None else self.injected_rows(i)


def guided_eps(
    calls: UNetCalls,
    bank: MemoryBank,
    prompts: Prompts,
    z: torch.Tensor,
    i: int,
    inject: bool,
    cfg_scale: float,
    image_prompt: ImagePromptRows | None = None,
) -> torch.Tensor:
    """ε of the generation rows at step i, with CFG; injected steps read the bank's K/V, and
    the generation rows read the image prompt when one is given."""
    cfg = cfg_scale != 1.0
    generation = torch.cat([z, z]) if cfg else z
    rows = bank.bank_rows(i) if inject else None
    nb = 0 if rows is None else rows.shape[0]
    batch = generation if rows is None else torch.cat([rows, generation])
    context = prompts.generation if rows is None else prompts.bank_and_generation
    prompting = nullcontext()
    if image_prompt is not None:
        calls.stats.image_prompt_steps += 1
        prompting = image_prompt.state.prompting(image_prompt.tokens, image_prompt.scale, nb)
    with bank.state.reading(i, nb) if inject else nullcontext(), prompting:
        out = calls.output(batch, i, context)[nb:]
    eps = calls.eps(out, z.expand_as(out), calls.schedule.alpha[i])
    return eps[:1] + cfg_scale * (eps[1:] - eps[:1]) if cfg else eps


class EnergyGuidance:
    """The regional energy gradient: the edit energy's gradient inside the edit mask, the content
    energy's outside, both from one backward through the truncated forward."""

    def __init__(
        self, calls: UNetCalls, bank: MemoryBank, prompts: Prompts, plan: LoopPlan, gain: float
    ) -> None:
        self.calls, self.bank, self.prompts, self.plan, self.gain = calls, bank, prompts, plan, gain
        self.edit_mask = plan.edit_mask.to(calls.timesteps.device, torch.float32)
        self._log: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def gradient(self, z: torch.Tensor, i: int) -> torch.Tensor:
        calls, plan, hw = self.calls, self.plan, self.plan.feature_hw
        self.calls.stats.guided_steps += 1
        # The bank's features need no gradient: a forward of their own, so the backward (and the
        # activations it keeps) covers only the two rows that need one.
        with torch.no_grad():
            bank_feats = calls.features(self.bank.rows_at(i), i, self.prompts.bank_features, hw)
        refs = [[f[k] for f in bank_feats] for k in range(self.bank.size)]
        # Two copies of z: the edit energy reads one and the content energy the other, so one
        # backward gives both gradients of the regional rule.
        z_edit = z.detach().clone().requires_grad_(True)
        z_content = z.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            feats = calls.features(torch.cat([z_edit, z_content]), i, self.prompts.source_pair, hw)
            e_edit = plan.edit_energy([f[0] for f in feats], refs)
            e_content = plan.content_energy([f[1] for f in feats], refs)
            # The backward starts from gain·E, as the reference's does: what flows back through
            # the (fp16) UNet is then the guidance itself, of ε's scale, inside fp16's normal
            # range at any working size (the bare energy's per-cell gradients are not).
            scaled = self.gain * (e_edit + e_content)
            g_edit, g_content = self._backward(scaled, z_edit, z_content)
        self._log.append((i, e_edit.detach(), e_content.detach()))  # read after the loop: no sync
        g_edit = torch.zeros_like(z) if g_edit is None else g_edit.float()
        g_content = torch.zeros_like(z) if g_content is None else g_content.float()
        return g_edit * self.edit_mask + g_content * (1 - self.edit_mask)

    def _backward(self, total: torch.Tensor, *leaves: torch.Tensor):
        if not total.requires_grad:  # no term touched the latent (e.g. every weight is zero)
            return (None,) * len(leaves)
        self.calls.stats.unet_backward += 1
        self.calls.stats.backward_rows.append(len(leaves) * leaves[0].shape[0])
        return torch.autograd.grad(total, list(leaves), allow_unused=True)

    def energies(self) -> list[tuple[int, float, float]]:
        """(step, edit energy, content energy) of every guided pass: one device → host copy."""
        if not self._log:
            return []
        values = torch.stack([torch.stack([e, c]) for _i, e, c in self._log]).float().cpu().tolist()
        return [(i, ec[0], ec[1]) for (i, _e, _c), ec in zip(self._log, values)]


class RegionalSDE:
    """DiffEditor's regional SDE: DDIM steps with fresh noise, stronger inside the edit region.
    All noise is drawn up front from the CPU generator (reproducible on any device), moved once."""

    def __init__(
        self,
        steps: Iterable[int],
        mask: torch.Tensor,
        settings: GuidanceSettings,
        shape: torch.Size,
        generator: torch.Generator,
        device: torch.device,
    ) -> None:
        self.mask = mask.to(device, torch.float32)
        self.inside, self.outside = settings.sde_strength, settings.sde_strength_outside
        order = sorted(steps)
        drawn = torch.randn((len(order), *shape), generator=generator).to(device) if order else None
        self.noise = {i: drawn[k] for k, i in enumerate(order)} if drawn is not None else {}

    def step(
        self, z: torch.Tensor, eps_hat: torch.Tensor, eps: torch.Tensor, a: float, ap: float, i: int
    ) -> torch.Tensor:
        sd = ddim_variance(a, ap) ** 0.5
        z_in = ddim_step(
            z, eps_hat, a, ap, eps_dir=eps, sigma=self.inside * sd, noise=self.noise[i]
        )
        z_out = ddim_step(
            z, eps_hat, a, ap, eps_dir=eps, sigma=self.outside * sd, noise=self.noise[i]
        )
        return self.mask * z_in + (1 - self.mask) * z_out


def renoise(calls: UNetCalls, prompts: Prompts, z_prev: torch.Tensor, i: int) -> torch.Tensor:
    """Time travel's rollback from after step i to before it: one deterministic inversion step
    (no CFG, no bank, no guidance)."""
    s = calls.schedule
    eps = calls.eps(calls.output(z_prev, i + 1, prompts.source), z_prev, s.alpha_prev[i])
    return inversion_step(z_prev, eps, s.alpha[i], s.alpha_prev[i])


def guided_edit(
    calls: UNetCalls,
    bank: MemoryBank,
    prompts: Prompts,
    plan: LoopPlan,
    steps: StepPlan,
    settings: GuidanceSettings,
    generator: torch.Generator,
    callback: Callable[[int], None] | None = None,
    image_prompt: ImagePromptRows | None = None,
) -> tuple[torch.Tensor, SamplerStats]:
    """DragonDiffusion's edit (DiffEditor's where `steps` has SDE and time-travel steps).

    Args:
        calls: the UNet calls (full and truncated forwards), counted in `calls.stats`.
        bank: the inverted trajectories the generation reads (source first).
        prompts: the context batches (`Prompts.build`).
        plan: the mode's attention, masks, energies and initial latent.
        steps: which steps are guided, injected, stochastic and repeated.
        settings: CFG scale, energy gain, SDE strengths.
        generator: a CPU generator for the SDE noise.
        callback: called with i after every step (progress, interruption).
        image_prompt: the image tokens the generation reads on `steps.image_prompt` (None: no
            image prompt).

    Returns:
        The edited latent z_0 (fp32) and the loop's statistics.
    """
    s = calls.schedule
    bank.prepare(calls, prompts, plan.attention, plan.latent_hw, steps.injected)
    energy = EnergyGuidance(calls, bank, prompts, plan, settings.energy_gain)
    z = plan.init_latent(*bank.noise()).float()
    sde = RegionalSDE(steps.sde, plan.sde_mask, settings, z.shape, generator, z.device)
    for i in range(s.steps):
        a, ap = s.alpha[i], s.alpha_prev[i]
        z_next = z
        for r in range(steps.passes(i)):
            if r:  # time travel: back to step i's noise level, then the step again
                z = renoise(calls, prompts, z_next, i)
            ip = image_prompt if i in steps.image_prompt else None
            inject = i in steps.injected
            eps = guided_eps(calls, bank, prompts, z, i, inject, settings.cfg_scale, ip)
            eps_hat = eps + energy.gradient(z, i) if i in steps.guided else eps
            if i in steps.sde:
                calls.stats.sde_steps += 1
                z_next = sde.step(z, eps_hat, eps, a, ap, i)
            else:
                z_next = ddim_step(z, eps_hat, a, ap, eps_dir=eps)
        z = z_next
        if callback:
            callback(i)
    calls.stats.energies = energy.energies()
    if not torch.isfinite(z).all():
        raise EditDiverged("the edit diverged (non-finite latent); lower guidance.energy_scale")
    return z, calls.stats


def reconstruct(
    calls: UNetCalls, trajectory: torch.Tensor, prompts: Prompts, state: BankState
) -> torch.Tensor:
    """Plain DDIM from the inverted noise back to z_0: no bank, no guidance (the baseline)."""
    hw = tuple(trajectory.shape[-2:])
    plan = LoopPlan(
        None,
        torch.zeros(hw, dtype=torch.bool),
        torch.zeros(hw, dtype=torch.bool),
        _no_energy,
        _no_energy,
        lambda z, _ref: z.clone(),
        hw,
        hw,
    )
    settings = GuidanceSettings(1.0, 0.0, 0.0, 0.0)
    z, _ = guided_edit(
        calls,
        MemoryBank([trajectory], state),
        prompts,
        plan,
        StepPlan.none(),
        settings,
        torch.Generator(),
    )
    return z


def _no_energy(_cur: Features, _refs: list[Features]) -> torch.Tensor:
    raise AssertionError("a plan without guided steps has no energy")
