"""The guided edit loop: two branches, classifier-free guidance, energy guidance, SDE, time travel.

Guidance branch: the inverted trajectories (the memory bank). Generation branch: starts from the
mode's initial latent and, at each step, (1) runs the UNet with the bank rows in the same batch so
decoder self-attention reads the bank's K/V, (2) on guided steps adds the regional energy gradient
to ε, (3) takes a DDIM step (with DiffEditor's regional SDE in its window), (4) in the time-travel
window repeats the step after re-noising. Latents are fp32; the UNet runs in the bundle's dtype.

`guided_edits` runs K edits of one source in one loop (`guided_edit` is K = 1): the bank rows are
shared, each edit has its own generation rows (edit after edit in every batch), and the guided steps
backpropagate the K energies' sum in one backward (the edits are independent, so each latent's
gradient is its own edit's).

The parts, in the order `guided_edits` uses them: `UNetCalls` (the model calls, counted),
`Prompts` (every context batch), `MemoryBank` (the guidance branch), `EnergyGuidance` (the energy
gradient), `RegionalSDE` (DiffEditor's stochastic steps), and the step functions `guided_eps`,
`renoise`. None of them reads the spec: settings arrive as plain values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

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
    bank_rows: int = 0  # of all those rows, the bank images' (shared by a batched loop's edits)
    stored_kv_bytes: int = 0  # with recorded K/V: the memory they take
    edits: int = 1  # edits that shared the loop
    # one edit's share of a batched loop's rows: its own rows, and each bank image's rows
    # divided among the edits that read that image (None: every row is this edit's)
    row_share: float | None = None
    energies: list[tuple[int, float, float]] = field(default_factory=list)  # (step, edit, content)

    @property
    def unet_row_passes(self) -> float:
        """Batch rows of every UNet call of the editing loop, forward and backward alike (shared
        rows divided among the edits sharing them): the work an edit costs."""
        if self.row_share is not None:
            return self.row_share
        return sum(self.forward_rows) + sum(self.feature_rows) + sum(self.backward_rows)


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

    def output(
        self, z: torch.Tensor, i: int, context: torch.Tensor, bank_rows: int = 0
    ) -> torch.Tensor:
        """The UNet's raw output (fp32) at step i's timestep (`bank_rows`: how many of z's rows
        are bank images')."""
        self.stats.unet_forward += 1
        self.stats.forward_rows.append(z.shape[0])
        self.stats.bank_rows += bank_rows
        with torch.no_grad():
            return self._forward(z, self.timesteps[i], context)

    def features(
        self,
        z: torch.Tensor,
        i: int,
        context: torch.Tensor,
        grid_hw: tuple[int, int],
        bank_rows: int = 0,
    ) -> Features:
        """The feature stages on the common grid, fp32 (to_grid copies them out of a compiled
        call's buffers before the next call)."""
        self.stats.unet_forward += 1
        self.stats.feature_rows.append(z.shape[0])
        self.stats.bank_rows += bank_rows
        return to_grid(self._features(z.to(self.dtype), self.timesteps[i], context), grid_hw)

    def eps(self, output: torch.Tensor, z: torch.Tensor, alpha: float) -> torch.Tensor:
        return to_eps(output, z, alpha, self.prediction_type)


@dataclass(frozen=True)
class Prompts:
    """Every context batch the loop uses, built once per loop rather than once per step."""

    bank: torch.Tensor  # one row per bank image
    # the bank images' guidance features read the source's prompt, as the reference's estimator
    # does (the bank rows themselves keep each image's own, as its inversion had)
    bank_features: torch.Tensor
    generation: torch.Tensor  # per edit: [unconditional, source] with CFG, else [source]
    bank_and_generation: torch.Tensor
    source: torch.Tensor  # the source's prompt (also the generation's), one row per edit
    source_pair: torch.Tensor  # the guided step's two copies of each edited latent

    @classmethod
    def build(
        cls, bank: list[torch.Tensor], uncond: torch.Tensor, cfg: bool, edits: int = 1
    ) -> Prompts:
        """`bank`: each bank image's prompt (the source's first); `edits`: the loop's edits."""
        source = bank[0]
        generation = (torch.cat([uncond, source]) if cfg else source).repeat(edits, 1, 1)
        bank_ctx = torch.cat(bank)
        return cls(
            bank_ctx,
            source.expand(len(bank), -1, -1),
            generation,
            torch.cat([bank_ctx, generation]),
            source.expand(edits, -1, -1),
            source.expand(2 * edits, -1, -1),
        )


@dataclass(frozen=True)
class LoopEdit:
    """One edit of a (batched) loop: its plan, settings, SDE noise and bank images."""

    plan: LoopPlan
    settings: GuidanceSettings
    generator: torch.Generator  # a CPU generator for its SDE noise
    images: tuple[int, ...] = (0,)  # its bank images' indices: the source's, then its second's


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
        self,
        trajectories: list[torch.Tensor],
        state: BankState,
        stored_kv: bool = False,
        refined: bool = False,
    ) -> None:
        self.trajectories, self.state = trajectories, state
        self.size = len(trajectories)
        self.n = trajectories[0].shape[0] - 1
        self.stored: dict | None = {} if stored_kv else None
        # plain DDIM inversion made step i's UNet call at L[n-1-i]; a refined one (`invert`'s
        # refine > 0) last called it at the new latent, L[n-i], the generation's own noise level
        self.injected_offset = 0 if refined else 1

    def noise(self, images: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z_T of an edit's source and of its second image (None for one-image modes)."""
        second = self.trajectories[images[1]][self.n] if len(images) > 1 else None
        return self.trajectories[images[0]][self.n], second

    def injected_rows(self, i: int) -> torch.Tensor:
        """The latents whose forward at step i's timestep reproduces the inversion's: L[n-1-i],
        or L[n-i] for refined trajectories."""
        return torch.cat([b[self.n - self.injected_offset - i] for b in self.trajectories])

    def rows_at(self, i: int) -> torch.Tensor:
        """The latents at step i's noise level (L[n-i]): the energies' references."""
        return torch.cat([b[self.n - i] for b in self.trajectories])

    def prepare(
        self,
        calls: UNetCalls,
        prompts: Prompts,
        readings: list[tuple[BankAttention | None, tuple[int, ...]]],
        latent_hw: tuple[int, int],
        injected: Iterable[int],
    ) -> None:
        """Configure the attention for the loop's edits (each edit's reading and bank images);
        record the K/V of every injected step when they are stored."""
        self.state.configure(readings, latent_hw, calls.timesteps.device, self.stored)
        if self.stored is None:
            return
        for i in sorted(injected):
            with self.state.recording(self.stored, i):
                calls.output(self.injected_rows(i), i, prompts.bank, bank_rows=self.size)
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
    """ε of each edit's generation rows (z: one row per edit) at step i, with CFG; injected
    steps read the bank's K/V, and the generation rows read the image prompt when one is given."""
    cfg = cfg_scale != 1.0
    generation = z.repeat_interleave(2, dim=0) if cfg else z  # per edit: [unconditional, cond]
    rows = bank.bank_rows(i) if inject else None
    nb = 0 if rows is None else rows.shape[0]
    batch = generation if rows is None else torch.cat([rows, generation])
    context = prompts.generation if rows is None else prompts.bank_and_generation
    prompting = nullcontext()
    if image_prompt is not None:
        calls.stats.image_prompt_steps += 1
        prompting = image_prompt.state.prompting(image_prompt.tokens, image_prompt.scale, nb)
    with bank.state.reading(i, nb) if inject else nullcontext(), prompting:
        out = calls.output(batch, i, context, bank_rows=nb)[nb:]
    eps = calls.eps(out, generation, calls.schedule.alpha[i])
    if not cfg:
        return eps
    eps = eps.unflatten(0, (z.shape[0], 2))
    return eps[:, 0] + cfg_scale * (eps[:, 1] - eps[:, 0])


class EnergyGuidance:
    """The regional energy gradient: each edit's edit-energy gradient inside its edit mask, its
    content energy's outside.

    One truncated forward of the edited latents, then two backwards (the edit energies', the
    content energies'). With `two_copies` the forward runs each latent twice instead (one copy
    per energy) and one backward gives both: one more forward row and twice the activations,
    for compiled CUDA graphs, whose replayed backward must not run twice over one forward.
    """

    def __init__(
        self,
        calls: UNetCalls,
        bank: MemoryBank,
        prompts: Prompts,
        edits: list[LoopEdit],
        two_copies: bool = False,
    ) -> None:
        self.calls, self.bank, self.prompts, self.edits = calls, bank, prompts, edits
        self.two_copies = two_copies
        dev = calls.timesteps.device
        masks = [e.plan.edit_mask.to(dev, torch.float32) for e in edits]
        self.edit_mask = torch.stack(masks)[:, None]  # K×1×h×w
        self.feature_hw = edits[0].plan.feature_hw
        self._log: list[tuple[int, torch.Tensor]] = []

    def gradient(self, z: torch.Tensor, i: int) -> torch.Tensor:
        calls, hw, k_edits = self.calls, self.feature_hw, z.shape[0]
        self.calls.stats.guided_steps += 1
        # The bank's features need no gradient: a forward of their own, so the backward (and the
        # activations it keeps) covers only the rows that need one.
        with torch.no_grad():
            bank_feats = calls.features(
                self.bank.rows_at(i), i, self.prompts.bank_features, hw, bank_rows=self.bank.size
            )
        refs = [[f[m] for f in bank_feats] for m in range(self.bank.size)]
        leaves = [z.detach().clone().requires_grad_(True) for _ in range(1 + self.two_copies)]
        context = self.prompts.source_pair if self.two_copies else self.prompts.source
        with torch.enable_grad():
            feats = calls.features(torch.cat(leaves), i, context, hw)
            content_row = k_edits if self.two_copies else 0  # the content energy's copy
            totals: list[torch.Tensor | None] = [None, None]
            energies = []
            for k, e in enumerate(self.edits):
                own = [refs[m] for m in e.images]
                e_edit = e.plan.edit_energy([f[k] for f in feats], own)
                e_content = e.plan.content_energy([f[content_row + k] for f in feats], own)
                energies.append(torch.stack([e_edit.detach(), e_content.detach()]))
                # The backward starts from gain·E, as the reference's does: what flows back
                # through the (fp16) UNet is then the guidance itself, of ε's scale, inside
                # fp16's normal range at any working size (the bare energy's is not).
                for n, term in enumerate((e_edit, e_content)):
                    scaled = e.settings.energy_gain * term
                    totals[n] = scaled if totals[n] is None else totals[n] + scaled
            g_edit, g_content = self._backward(totals, leaves)
        self._log.append((i, torch.stack(energies)))  # read after the loop: no sync
        g_edit = torch.zeros_like(z) if g_edit is None else g_edit.float()
        g_content = torch.zeros_like(z) if g_content is None else g_content.float()
        return g_edit * self.edit_mask + g_content * (1 - self.edit_mask)

    def _backward(
        self, totals: list[torch.Tensor | None], leaves: list[torch.Tensor]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(∂ edit total/∂z, ∂ content total/∂z); None where no term touched the latent (e.g.
        every weight is zero)."""
        stats = self.calls.stats
        live = [t is not None and t.requires_grad for t in totals]
        if self.two_copies:
            if not any(live):
                return None, None
            stats.unet_backward += 1
            stats.backward_rows.append(len(leaves) * leaves[0].shape[0])
            total = sum(t for t, on in zip(totals, live) if on)
            g = torch.autograd.grad(total, leaves, allow_unused=True)
            return g[0], g[1]
        grads: list[torch.Tensor | None] = []
        for n, (total, on) in enumerate(zip(totals, live)):
            if not on:
                grads.append(None)
                continue
            stats.unet_backward += 1
            stats.backward_rows.append(leaves[0].shape[0])
            retain = any(live[n + 1 :])  # the content energies' backward still needs the graph
            g = torch.autograd.grad(total, leaves, retain_graph=retain, allow_unused=True)
            grads.append(g[0])
        return grads[0], grads[1]

    def energies(self) -> list[list[tuple[int, float, float]]]:
        """Each edit's (step, edit energy, content energy) of every guided pass: one device →
        host copy."""
        if not self._log:
            return [[] for _ in self.edits]
        values = torch.stack([e for _i, e in self._log]).float().cpu().tolist()
        steps = [i for i, _e in self._log]
        return [
            [(i, v[k][0], v[k][1]) for i, v in zip(steps, values)] for k in range(len(self.edits))
        ]


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


def guided_edits(
    calls: UNetCalls,
    bank: MemoryBank,
    prompts: Prompts,
    edits: list[LoopEdit],
    steps: StepPlan,
    callback: Callable[[int], None] | None = None,
    image_prompt: ImagePromptRows | None = None,
    two_copies: bool = False,
) -> tuple[list[torch.Tensor], list[SamplerStats]]:
    """DragonDiffusion's edit (DiffEditor's where `steps` has SDE and time-travel steps) of K
    edits of one source in one loop.

    Args:
        calls: the UNet calls (full and truncated forwards), counted in `calls.stats`.
        bank: the inverted trajectories the edits read (the shared source first).
        prompts: the context batches (`Prompts.build` for `len(edits)` edits).
        edits: each edit's plan (attention, masks, energies, initial latent), settings (their
            CFG scale must agree), SDE generator and bank images.
        steps: which steps are guided, injected, stochastic and repeated (all edits alike).
        callback: called with i after every step (progress, interruption).
        image_prompt: the image tokens the generation reads on `steps.image_prompt` (None: no
            image prompt; one edit only).
        two_copies: the guided steps' forward runs each latent twice (see `EnergyGuidance`).

    Returns:
        Each edit's z_0 (fp32, 1×C×h×w; non-finite where that edit diverged) and its statistics
        (the loop's counts, its own energies, its share of the row-passes).
    """
    s = calls.schedule
    cfg_scale = edits[0].settings.cfg_scale
    if any(e.settings.cfg_scale != cfg_scale for e in edits):
        raise ValueError("a batched loop's edits share one CFG scale")
    if image_prompt is not None and len(edits) > 1:
        raise ValueError("an image prompt is one edit's")
    readings = [(e.plan.attention, e.images) for e in edits]
    bank.prepare(calls, prompts, readings, edits[0].plan.latent_hw, steps.injected)
    energy = EnergyGuidance(calls, bank, prompts, edits, two_copies)
    z = torch.cat([e.plan.init_latent(*bank.noise(e.images)).float() for e in edits])
    sdes = [
        RegionalSDE(steps.sde, e.plan.sde_mask, e.settings, z[:1].shape, e.generator, z.device)
        for e in edits
    ]
    for i in range(s.steps):
        a, ap = s.alpha[i], s.alpha_prev[i]
        z_next = z
        for r in range(steps.passes(i)):
            if r:  # time travel: back to step i's noise level, then the step again
                z = renoise(calls, prompts, z_next, i)
            ip = image_prompt if i in steps.image_prompt else None
            inject = i in steps.injected
            eps = guided_eps(calls, bank, prompts, z, i, inject, cfg_scale, ip)
            eps_hat = eps + energy.gradient(z, i) if i in steps.guided else eps
            if i in steps.sde:
                calls.stats.sde_steps += 1
                z_next = torch.cat(
                    [
                        sde.step(z[k : k + 1], eps_hat[k : k + 1], eps[k : k + 1], a, ap, i)
                        for k, sde in enumerate(sdes)
                    ]
                )
            else:
                z_next = ddim_step(z, eps_hat, a, ap, eps_dir=eps)
        z = z_next
        if callback:
            callback(i)
    shares = row_shares(calls.stats, bank.size, [e.images for e in edits])
    stats = [
        replace(calls.stats, energies=own, edits=len(edits), row_share=share)
        for own, share in zip(energy.energies(), shares)
    ]
    return list(z.split(1)), stats


def row_shares(stats: SamplerStats, bank_size: int, images: list[tuple[int, ...]]) -> list[float]:
    """Each edit's share of a loop's row-passes: its own generation and guidance rows (an equal
    part of the non-bank rows), plus each of its bank images' rows divided among the edits
    reading that image (every bank call runs every bank image once)."""
    total = sum(stats.forward_rows) + sum(stats.feature_rows) + sum(stats.backward_rows)
    per_image = stats.bank_rows / bank_size
    readers = [sum(m in own for own in images) for m in range(bank_size)]
    own_rows = (total - stats.bank_rows) / len(images)
    return [own_rows + sum(per_image / readers[m] for m in set(own)) for own in images]


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
    two_copies: bool = False,
) -> tuple[torch.Tensor, SamplerStats]:
    """One edit (`guided_edits` with K = 1, reading every bank image). Raises `EditDiverged`
    for a non-finite result."""
    edit = LoopEdit(plan, settings, generator, tuple(range(bank.size)))
    z, stats = guided_edits(calls, bank, prompts, [edit], steps, callback, image_prompt, two_copies)
    if not torch.isfinite(z[0]).all():
        raise EditDiverged(DIVERGED)
    return z[0], stats[0]


DIVERGED = "the edit diverged (non-finite latent); lower guidance.energy_scale"


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
