"""Appearance: the object takes the reference object's look (mean-pooled features) and keeps its
place and layout; the decoder reads the source's background and the reference object's interior."""

from __future__ import annotations

import math

import torch

from dragonctl import energies, geometry
from dragonctl.attention import BankAttention
from dragonctl.geometry import Frame, Grids
from dragonctl.inputs import EditInputs
from dragonctl.modes import EditPlan, cells, latent_mask, plan_on
from dragonctl.spec import Spec


def plan(spec: Spec, inp: EditInputs, frame: Frame, grids: Grids, dev: torch.device) -> EditPlan:
    assert inp.reference is not None and inp.reference_mask is not None and inp.mask is not None
    g = spec.guidance
    # the masks as drawn; the reference is placed over the object at the object's size
    ref_obj, src_obj = inp.reference_mask, inp.mask
    scale = math.sqrt(src_obj.sum() / ref_obj.sum())
    placed, placed_mask = geometry.place_reference(
        inp.reference, ref_obj, scale, geometry.bbox_center(src_obj), inp.source.shape[:2]
    )
    ref_obj_w = frame.mask_to_work(placed_mask)
    obj_w = frame.mask_to_work(src_obj)
    obj_f = grids.feature(obj_w)
    obj_idx = cells(obj_f, dev)
    ref_idx = cells(grids.feature(ref_obj_w), dev)
    keep = cells(~obj_f, dev)
    structure_idx = energies.spread(obj_idx, energies.STRUCTURE_CELLS)

    def edit_energy(cur, refs):
        return energies.appearance_edit_energy(
            cur, refs[1], refs[0], obj_idx, ref_idx, structure_idx, g.w_edit, g.w_structure
        )

    def content_energy(cur, refs):
        return energies.content_energy(cur, refs[0], keep, g.w_content)

    obj_lat = latent_mask(grids.latent(obj_w))
    obj_core = latent_mask(grids.latent_core(obj_w))
    ref_core = latent_mask(grids.latent_core(ref_obj_w))

    def init_latent(z_src: torch.Tensor, z_ref: torch.Tensor | None) -> torch.Tensor:
        if g.appearance_init == "source":
            return z_src.clone()
        assert z_ref is not None
        return transfer_statistics(
            z_src, obj_core.to(z_src.device), z_ref, ref_core.to(z_src.device)
        )

    # The reference object's border tokens carry its outline, which the recoloured object takes
    # on: the decoder reads its interior only (less one latent cell).
    attention = BankAttention(
        "composite",
        base_keep=~obj_w,
        ref_keep=geometry.interior(ref_obj_w, grids.latent_factor),
        query_region=obj_w if g.regional_attention else None,
    )
    return plan_on(
        grids,
        spec.mode,
        attention,
        obj_lat,
        edit_energy,
        content_energy,
        init_latent,
        second_image=frame.image_to_work(placed),
    )


def transfer_statistics(
    z: torch.Tensor,
    region: torch.Tensor,
    z_ref: torch.Tensor,
    ref_region: torch.Tensor,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Copy of z whose cells in `region` take, channel by channel, the mean and spread z_ref has
    in `ref_region` (AdaIN on the inverted noise): the region starts from the reference's colours
    and keeps its own layout (each cell's standardised value). Regions are h×w boolean masks."""
    out = z.clone()
    a, b = z[..., region], z_ref[..., ref_region]

    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sd = x.std(-1, keepdim=True) if x.shape[-1] > 1 else torch.ones_like(x[..., :1])
        return x.mean(-1, keepdim=True), sd

    (mu_a, sd_a), (mu_b, sd_b) = stats(a), stats(b)
    out[..., region] = (a - mu_a) / (sd_a + eps) * sd_b + mu_b
    return out
