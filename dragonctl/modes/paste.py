"""Paste: the reference, scaled and placed so its mask's box centre lands at `at`, is a second
bank image; the pasted region starts from its inverted noise over the source's, reads its K/V
(the source's elsewhere), and its features are guided to the placed reference's, cell by cell."""

from __future__ import annotations

import torch

from dragonctl import energies, geometry
from dragonctl.attention import BankAttention
from dragonctl.geometry import Frame, Grids
from dragonctl.inputs import EditInputs
from dragonctl.modes import EditPlan, cells, latent_mask, plan_on
from dragonctl.spec import Spec


def plan(spec: Spec, inp: EditInputs, frame: Frame, grids: Grids, dev: torch.device) -> EditPlan:
    assert inp.reference is not None and inp.reference_mask is not None and spec.at is not None
    g = spec.guidance
    placed, placed_mask = geometry.place_reference(
        inp.reference,
        inp.reference_mask,
        spec.effective_scale,
        (spec.at[0], spec.at[1]),
        inp.source.shape[:2],
    )
    region_w = frame.mask_to_work(placed_mask)
    region_f = grids.feature(region_w)
    region_idx = cells(region_f, dev)
    keep = cells(~region_f, dev)
    region_lat = latent_mask(grids.latent(region_w))

    def edit_energy(cur, refs):
        return energies.paste_edit_energy(cur, refs[1], region_idx, g.w_edit)

    def content_energy(cur, refs):
        return energies.content_energy(cur, refs[0], keep, g.w_content)

    def init_latent(z_src: torch.Tensor, z_ref: torch.Tensor | None) -> torch.Tensor:
        assert z_ref is not None
        return torch.where(region_lat.to(z_src.device), z_ref, z_src)

    attention = BankAttention(
        "composite",
        base_keep=~region_w,
        ref_keep=region_w,
        query_region=region_w if g.regional_attention else None,
    )
    return plan_on(
        grids,
        spec.mode,
        attention,
        region_lat,
        edit_energy,
        content_energy,
        init_latent,
        second_image=frame.image_to_work(placed),
    )
