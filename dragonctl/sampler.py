"""The guided edit loop: two branches, classifier-free guidance, energy guidance, SDE and time travel.

Guidance branch: the inverted trajectory (the memory bank). Generation branch: starts from the
mode's initial latent and, at each step, (1) runs the UNet with the bank rows in the same batch so
decoder self-attention reads the bank's K/V, (2) on guided steps adds the regional energy gradient to
ε, (3) takes a DDIM step (with DiffEditor's regional SDE in its window), (4) in the time-travel
window repeats the step after re-noising. Latents are fp32; the UNet runs in the bundle's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dragonctl.attention import BankState
from dragonctl.features import FeatureForward, to_grid
from dragonctl.models import UNetForward
from dragonctl.modes import EditPlan, Grids
from dragonctl.schedules import Schedule, StepPlan, ddim_step, ddim_variance, inversion_step, to_eps
from dragonctl.spec import Guidance

ENERGY_UNIT = 1000.0  # the reference's energy scale is its slider value × 1000


@dataclass
class SamplerStats:
    unet_forward: int = 0  # UNet calls (any batch size; truncated guidance forwards included)
    unet_backward: int = 0
    guided_steps: int = 0
    stored_kv_bytes: int = 0  # with kv_bank "stored": the memory the recorded K/V take
    energies: list[tuple[int, float, float]] = field(default_factory=list)  # (step, E_edit, E_content)


@dataclass
class Branches:
    """The memory bank and the contexts, all on the device."""

    bank: list[torch.Tensor]  # one trajectory [n+1, 1, C, h, w] per bank image (source, then reference)
    cond: list[torch.Tensor]  # context per bank image (the source's prompt first: also the generation prompt)
    uncond: torch.Tensor


def guided_edit(features: FeatureForward, forward: UNetForward, dtype: torch.dtype, prediction_type: str,
                schedule: Schedule, plan: EditPlan, steps: StepPlan, g: Guidance, branches: Branches,
                state: BankState, grids: Grids, generator: torch.Generator,
                progress: Callable[[], None] | None = None,
                kv_bank: str = "recompute") -> tuple[torch.Tensor, SamplerStats]:
    """Run the edit loop; `forward` is the full UNet call, `features` the guided steps' truncated one
    (both possibly compiled)."""
    dev = branches.uncond.device
    n = schedule.steps
    stats = SamplerStats()
    cfg = g.cfg_scale != 1.0
    nb = len(branches.bank)
    state.latent_hw = grids.latent_hw
    if plan.bank_mode == "composite":
        state.base_keep = torch.from_numpy(plan.composite_base_keep)
        state.ref_keep = torch.from_numpy(plan.composite_ref_keep)
        state.query_region = torch.from_numpy(plan.target_work) if g.regional_attention else None
        state.prepare(dev)
    edit_mask = plan.edit_latent_mask.to(dev, torch.float32)
    sde_mask = plan.sde_latent_mask.to(dev, torch.float32)
    gain = g.gradient_scale * ENERGY_UNIT * g.energy_scale
    c_gen = branches.cond[0]
    # Every prompt batch the loop uses, built once per edit rather than once per step.
    bank_ctx = torch.cat(branches.cond)
    gen_ctx = torch.cat([branches.uncond, c_gen]) if cfg else c_gen
    bank_gen_ctx = torch.cat([bank_ctx, gen_ctx])
    gen_ctx_pair = c_gen.expand(2, -1, -1)

    # All timesteps go to the device once: a Python int per call would be a host→device copy per call.
    t_dev = torch.tensor(schedule.timesteps, device=dev)

    def unet_out(z: torch.Tensor, k: int, ctx: torch.Tensor) -> torch.Tensor:
        stats.unet_forward += 1
        with torch.no_grad():
            return forward(z, t_dev[k], ctx)

    stored: dict | None = None
    if kv_bank == "stored":
        # Record the bank's K/V for every injected step in one pass up front (same inputs as the rows).
        stored = {}
        state.record = stored
        for i in sorted(steps.injected):
            state.step = i
            unet_out(torch.cat([b[n - 1 - i] for b in branches.bank]), i, bank_ctx)
        state.record = None
        stats.stored_kv_bytes = sum(k.numel() * k.element_size() * 2 for k, _v in stored.values())

    def eps_cfg(z: torch.Tensor, i: int) -> torch.Tensor:
        inject = i in steps.injected
        bank_rows = inject and stored is None
        rows = [b[n - 1 - i] for b in branches.bank] if bank_rows else []
        rows += [z, z] if cfg else [z]
        state.mode, state.n_bank = (plan.bank_mode, nb if bank_rows else 0) if inject else ("off", 0)
        state.step, state.stored = i, stored
        out = unet_out(torch.cat(rows), i, bank_gen_ctx if bank_rows else gen_ctx)[nb if bank_rows else 0 :]
        state.mode, state.n_bank, state.stored = "off", 0, None
        eps = to_eps(out, z.expand_as(out), schedule.alpha[i], prediction_type)
        if cfg:
            return eps[:1] + g.cfg_scale * (eps[1:] - eps[:1])
        return eps

    def energy_gradient(z: torch.Tensor, i: int) -> torch.Tensor:
        # The bank's features need no gradient: a forward of their own, so the backward (and the
        # activations it keeps) covers only the two rows that need one. to_grid copies them out of a
        # compiled call's buffers before the next call.
        stats.unet_forward += 2
        with torch.no_grad():
            bank_rows = torch.cat([b[n - i] for b in branches.bank]).to(dtype)
            bank_feats = to_grid(features(bank_rows, t_dev[i], bank_ctx), grids.feature_hw)
        refs = [[f[k] for f in bank_feats] for k in range(nb)]
        # Two copies of z: the edit energy is read from one and the content energy from the other, so
        # a single backward gives both gradients of the regional rule.
        z_edit = z.detach().clone().requires_grad_(True)
        z_content = z.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            feats = to_grid(features(torch.cat([z_edit, z_content]).to(dtype), t_dev[i], gen_ctx_pair), grids.feature_hw)
            e_edit = plan.edit_energy([f[0] for f in feats], refs)
            e_content = plan.content_energy([f[1] for f in feats], refs)
            total = e_edit + e_content
            if total.requires_grad:
                stats.unet_backward += 1
                g_edit, g_content = torch.autograd.grad(total, [z_edit, z_content], allow_unused=True)
            else:
                g_edit = g_content = None
        energy_log.append((i, e_edit.detach(), e_content.detach()))  # read after the loop: no sync here
        g_edit = torch.zeros_like(z) if g_edit is None else g_edit.float()
        g_content = torch.zeros_like(z) if g_content is None else g_content.float()
        return gain * (g_edit * edit_mask + g_content * (1 - edit_mask))

    def denoise_step(z: torch.Tensor, i: int) -> torch.Tensor:
        a, ap = schedule.alpha[i], schedule.alpha_prev[i]
        eps = eps_cfg(z, i)
        eps_hat = eps
        if i in steps.guided:
            stats.guided_steps += 1
            eps_hat = eps + energy_gradient(z, i)
        if i not in steps.sde:
            return ddim_step(z, eps_hat, a, ap, eps_dir=eps)
        var = ddim_variance(a, ap)
        noise = sde_noise[i]
        z_in = ddim_step(z, eps_hat, a, ap, eps_dir=eps, sigma=g.sde_strength * var**0.5, noise=noise)
        z_out = ddim_step(z, eps_hat, a, ap, eps_dir=eps, sigma=g.sde_strength_outside * var**0.5, noise=noise)
        return sde_mask * z_in + (1 - sde_mask) * z_out

    def renoise(z_prev: torch.Tensor, i: int) -> torch.Tensor:
        # Time travel's rollback: one deterministic inversion step, no CFG, no bank, no guidance.
        out = unet_out(z_prev, i + 1, c_gen)
        eps = to_eps(out, z_prev, schedule.alpha_prev[i], prediction_type)
        return inversion_step(z_prev, eps, schedule.alpha[i], schedule.alpha_prev[i])

    z_src_T = branches.bank[0][n]
    z_ref_T = branches.bank[1][n] if nb > 1 else None
    z = plan.init_latent(z_src_T, z_ref_T).float()
    energy_log: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    # All SDE noise is drawn up front from the CPU generator (reproducible on any device) and moved once.
    sde_steps = sorted(steps.sde)
    drawn = torch.randn((len(sde_steps), *z.shape), generator=generator).to(dev) if sde_steps else None
    sde_noise = {i: drawn[k] for k, i in enumerate(sde_steps)} if drawn is not None else {}
    for i in range(n):
        repeats = steps.repeats if i in steps.time_travel else 1
        for r in range(repeats):
            z_next = denoise_step(z, i)
            if r < repeats - 1:
                z = renoise(z_next, i)  # the reference's last re-noise is discarded work; we skip it
        z = z_next
        if progress:
            progress()
    if energy_log:  # one device → host copy for the whole log
        values = torch.stack([torch.stack([e, c]) for _i, e, c in energy_log]).float().cpu().tolist()
        stats.energies = [(i, ec[0], ec[1]) for (i, _e, _c), ec in zip(energy_log, values)]
    if not torch.isfinite(z).all():
        raise FloatingPointError("the edit diverged (non-finite latent); lower guidance.energy_scale")
    return z, stats
