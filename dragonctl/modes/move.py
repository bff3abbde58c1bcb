"""Move (and resize by correspondence): the object's features at its old place guide its new
place; the generation starts from the inverted noise with the object's cells copied there."""

from __future__ import annotations

import numpy as np
import torch

from dragonctl import energies, geometry
from dragonctl.attention import BankAttention
from dragonctl.geometry import Frame, Grids
from dragonctl.inputs import EditInputs
from dragonctl.modes import EditPlan, cells, latent_mask, plan_on
from dragonctl.spec import Spec


def plan(spec: Spec, inp: EditInputs, frame: Frame, grids: Grids, dev: torch.device) -> EditPlan:
    g = spec.guidance
    assert inp.mask is not None
    obj_w = frame.mask_to_work(inp.mask)
    s = spec.effective_scale
    dx, dy = spec.offset or (0.0, 0.0)
    cx, cy = geometry.bbox_center(inp.mask)
    c_w = (cx * frame.sx, cy * frame.sy)
    dest_w = ((cx + dx) * frame.sx, (cy + dy) * frame.sy)
    target_w = geometry.warp_mask(obj_w, s, c_w, dest_w, obj_w.shape)

    # Feature grid: target cells and the source cells their content comes from.
    cell = grids.feature_cell
    hf, wf = grids.feature_hw
    obj_f = grids.feature(obj_w)
    iy, ix = geometry.warp_index(
        (hf, wf), (hf, wf), s, (c_w[0] / cell, c_w[1] / cell), (dest_w[0] / cell, dest_w[1] / cell)
    )
    valid = iy >= 0
    tgt_f = np.zeros((hf, wf), dtype=bool)
    tgt_f[valid] = obj_f[iy[valid], ix[valid]]
    target_idx = cells(tgt_f, dev)
    source_idx = torch.from_numpy((iy * wf + ix).flatten()[np.flatnonzero(tgt_f)]).to(dev)
    unchanged = cells(~(tgt_f | obj_f), dev)
    vacated = cells(obj_f & ~tgt_f, dev)
    fill = unchanged
    if inp.fill_region is not None:
        fill = cells(grids.feature(frame.mask_to_work(inp.fill_region)), dev)

    def edit_energy(cur, refs):
        return energies.move_edit_energy(cur, refs[0], target_idx, source_idx, g.w_edit)

    def content_energy(cur, refs):
        return energies.move_content_energy(
            cur, refs[0], unchanged, vacated, fill, g.w_content, g.w_contrast, g.w_inpaint
        )

    lf = grids.latent_factor
    obj_lat = latent_mask(grids.latent(obj_w))
    center, dest = (c_w[0] / lf, c_w[1] / lf), (dest_w[0] / lf, dest_w[1] / lf)

    def init_latent(z_src: torch.Tensor, _z_ref: torch.Tensor | None) -> torch.Tensor:
        return warp_latent(z_src, obj_lat, s, center, dest)

    edit_mask = latent_mask(grids.latent(target_w))
    sde_mask = latent_mask(grids.latent(target_w | obj_w))
    return plan_on(
        grids,
        spec.mode,
        BankAttention("replace"),
        edit_mask,
        edit_energy,
        content_energy,
        init_latent,
        sde_mask=sde_mask,
    )


def warp_latent(
    z: torch.Tensor,
    src_mask: torch.Tensor,
    scale: float,
    center: tuple[float, float],
    dest: tuple[float, float],
) -> torch.Tensor:
    """A copy of z whose cells take the source cell they come from, where that is in src_mask."""
    h, w = z.shape[-2:]
    iy, ix = geometry.warp_index((h, w), (h, w), scale, center, dest)
    iy_t, ix_t = torch.from_numpy(iy), torch.from_numpy(ix)
    valid = iy_t >= 0
    take = torch.zeros((h, w), dtype=torch.bool)
    take[valid] = src_mask[iy_t[valid], ix_t[valid]]
    out = z.clone()
    out[..., take] = z[..., iy_t[take], ix_t[take]]
    return out
