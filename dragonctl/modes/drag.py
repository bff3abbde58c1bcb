"""Drag: each handle patch's features guide its target patch inside the editable region; the
generation attends to its own K/V and the source's (concat) and starts with each handle patch's
inverted noise copied onto its target. Beyond the reference, `w_fill` asks the handles' vacated
cells to look like the region's surroundings (move's inpaint term, pooled): the reference's
contrast term (`w_inpaint`) only asks them to stop looking like the handle."""

from __future__ import annotations

import torch

from dragonctl import energies
from dragonctl.attention import BankAttention
from dragonctl.geometry import Frame, Grids, grid_ratio, patch_indices
from dragonctl.inputs import EditInputs
from dragonctl.modes import EditPlan, cells, latent_mask, plan_on
from dragonctl.spec import Spec


def plan(spec: Spec, inp: EditInputs, frame: Frame, grids: Grids, dev: torch.device) -> EditPlan:
    g = spec.guidance
    assert inp.mask is not None
    region_w = frame.mask_to_work(inp.mask)
    cell, hw = grids.feature_cell, grids.feature_hw
    pairs = []
    work_pairs = []
    for (hx, hy), (tx, ty) in inp.points:
        if (hx, hy) == (tx, ty):
            continue  # zero-length: nothing to move (the reference produced NaN here)
        h_w, t_w = frame.to_work(hx, hy), frame.to_work(tx, ty)
        work_pairs.append((h_w, t_w))
        handle = torch.from_numpy(patch_indices(*h_w, cell, hw))
        target = torch.from_numpy(patch_indices(*t_w, cell, hw))
        pairs.append(tuple(t.to(dev) for t in energies.drag_pair(handle, target)))
    keep = cells(~grids.feature(region_w), dev)
    # the handles' cells their targets do not cover: move's inpaint term there (`w_fill`)
    vacated = torch.unique(torch.cat([v for _h, _t, v in pairs])) if pairs else keep[:0]
    # the patches are 3×3 cells at any size: their term does not thin out with the grid, so it
    # undoes the gain's per-cell normalisation (the reference's strength per patch cell anywhere)
    fixed_cells = 1 / grid_ratio(hw, grids.latent_factor, g.energy_resolution)

    def edit_energy(cur, refs):
        e = energies.drag_edit_energy(cur, refs[0], pairs, g.w_edit, g.w_inpaint)
        e = e + energies.global_match(cur, refs[0], vacated, keep, g.w_fill)
        return e * fixed_cells

    def content_energy(cur, refs):
        return energies.content_energy(cur, refs[0], keep, g.w_content, layer_weight=0.5)

    lf, lat_hw = grids.latent_factor, grids.latent_hw
    patches = [
        (
            torch.from_numpy(patch_indices(*h_w, lf, lat_hw)),
            torch.from_numpy(patch_indices(*t_w, lf, lat_hw)),
        )
        for h_w, t_w in work_pairs
    ]

    def init_latent(z_src: torch.Tensor, _z_ref: torch.Tensor | None) -> torch.Tensor:
        out = z_src.clone()  # a copy: the reference wrote into the bank's own z_T
        flat_src = z_src.reshape(*z_src.shape[:-2], -1)
        for src, dst in patches:
            out.view(*out.shape[:-2], -1)[..., dst] = flat_src[..., src]
        return out

    region_lat = latent_mask(grids.latent(region_w))
    return plan_on(
        grids, "drag", BankAttention("concat"), region_lat, edit_energy, content_energy, init_latent
    )
