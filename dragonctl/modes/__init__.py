"""Per-mode set-up: from a spec's inputs to an `EditPlan` on the model's grids.

A plan holds everything mode-specific the sampler needs: how the generation branch reads the
memory bank (`BankAttention`), the initial latent (the mode's copy of inverted noise), the edit and
SDE masks on the latent grid, the edit and content energies closed over their cell indices, and,
for modes that read a second image, that image at working size. Masks are used as drawn: nothing
here looks at the pixels inside them. One module per mode:

| mode | plan | bank reading |
|---|---|---|
| move, resize | `move.plan` | replace |
| drag | `drag.plan` | concat |
| appearance | `appearance.plan` | composite |
| paste | `paste.plan` | composite |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dragonctl.geometry import Frame, Grids
from dragonctl.inputs import EditInputs
from dragonctl.sampler import LoopPlan
from dragonctl.spec import Spec


@dataclass(frozen=True)
class EditPlan(LoopPlan):
    """A mode's plan: what the loop needs, and the second bank image (None for one-image modes)."""

    mode: str = ""
    second_image: np.ndarray | None = None  # working size, pixel-aligned with the source


def plan_on(
    grids: Grids,
    mode: str,
    attention,
    edit_mask: torch.Tensor,
    edit_energy,
    content_energy,
    init_latent,
    sde_mask: torch.Tensor | None = None,
    second_image: np.ndarray | None = None,
) -> EditPlan:
    """An `EditPlan` on `grids`; the SDE region is the edit region unless given."""
    return EditPlan(
        attention=attention,
        edit_mask=edit_mask,
        sde_mask=edit_mask if sde_mask is None else sde_mask,
        edit_energy=edit_energy,
        content_energy=content_energy,
        init_latent=init_latent,
        latent_hw=grids.latent_hw,
        feature_hw=grids.feature_hw,
        mode=mode,
        second_image=second_image,
    )


def build_plan(
    spec: Spec,
    inp: EditInputs,
    frame: Frame,
    latent_factor: int,
    device: torch.device | str = "cpu",
) -> EditPlan:
    """The mode's plan; the energies' cell indices go to `device` (the features' device) here."""
    from dragonctl.modes import appearance, drag, move, paste

    grids = Grids((frame.work_h, frame.work_w), latent_factor)
    dev = torch.device(device)
    by_mode = {
        "move": move.plan,
        "resize": move.plan,
        "drag": drag.plan,
        "appearance": appearance.plan,
        "paste": paste.plan,
    }
    return by_mode[spec.mode](spec, inp, frame, grids, dev)


def cells(mask: np.ndarray, device: torch.device) -> torch.Tensor:
    """A grid mask's flat cell indices on the features' device (host indices inside the loop
    would cost a sync per guided step)."""
    return torch.from_numpy(np.flatnonzero(mask)).to(device)


def latent_mask(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask))
