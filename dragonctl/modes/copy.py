"""Generation from a pixel-aligned copy: move's and resize's object moved (and scaled) over the
source, paste's placed reference, and appearance's object recoloured like the reference.

The copy is the source with the wanted content in a region: a second bank image. The whole
generation starts from the copy's inverted noise and reads the copy's K/V; the region's features
are guided to the copy's, cell by cell, and the rest keeps the copy's (there, the source's).
Paste's `composite` method (the reference's) instead starts only the region from the placed
reference's noise, over the source's, and reads the reference's K/V there, the source's elsewhere.
"""

from __future__ import annotations

import numpy as np
import torch

from dragonctl import energies, geometry
from dragonctl.attention import BankAttention
from dragonctl.geometry import Frame, Grids
from dragonctl.inputs import EditInputs
from dragonctl.modes import EditPlan, cells, latent_mask, plan_on
from dragonctl.spec import Spec


def copy_plan(
    spec: Spec,
    grids: Grids,
    dev: torch.device,
    copy_work: np.ndarray,
    region_w: np.ndarray,
    composite: bool = False,
) -> EditPlan:
    """The plan of a copy (working size) that is the source outside `region_w` (with `composite`:
    right only inside it).

    The copy's noise and K/V, not the source's, outside the region too: inverted noise is not
    local (the source's around a recoloured object still encodes its old colour), and at coarse
    layers the cells the region half-covers would carry the source's K/V; both dissolved copied
    objects into speckle."""
    g = spec.guidance
    region_f = grids.feature(region_w)
    region_idx = cells(region_f, dev)
    keep = cells(~region_f, dev)
    outside = 0 if composite else 1  # the bank image whose features the rest keeps

    def edit_energy(cur, refs):
        return energies.copy_edit_energy(cur, refs[1], region_idx, g.w_edit)

    def content_energy(cur, refs):
        return energies.content_energy(cur, refs[outside], keep, g.w_content)

    region_lat = latent_mask(grids.latent(region_w))

    def init_latent(z_src: torch.Tensor, z_copy: torch.Tensor | None) -> torch.Tensor:
        assert z_copy is not None
        if composite:
            return torch.where(region_lat.to(z_src.device), z_copy, z_src)
        return z_copy.clone()

    read_copy = region_w if composite else np.ones_like(region_w)
    attention = BankAttention(
        "composite",
        base_keep=~read_copy,
        ref_keep=read_copy,
        query_region=region_w if composite and g.regional_attention else None,
    )
    return plan_on(
        grids,
        spec.mode,
        attention,
        region_lat,
        edit_energy,
        content_energy,
        init_latent,
        second_image=copy_work,
    )


def over_source(
    frame: Frame, inp: EditInputs, edited: np.ndarray, region_w: np.ndarray
) -> np.ndarray:
    """The edited image (source size) inside the working-size region, the source outside: resizing
    to working size spreads an edit's edge past the region."""
    source_w = frame.image_to_work(inp.source)
    return np.where(region_w[..., None], frame.image_to_work(edited), source_w)


def scaled_copy_plan(
    spec: Spec, inp: EditInputs, frame: Frame, grids: Grids, dev: torch.device
) -> EditPlan:
    """Move or resize from an image-space copy: the object found in the mask, offset (and scaled
    about the mask's centre), over the source with the object's old place painted from its
    surroundings (`geometry.fill_from_rim`). A small resize moves the outline by less than a
    latent cell, which correspondence guidance barely moves; the copy resamples the object
    exactly. A move starts the object where it goes, in its own colours, where correspondence
    guidance must draw it there. Only the object moves: neighbours inside a loose mask stay."""
    assert inp.mask is not None and inp.target_mask is not None
    dx, dy = spec.offset or (0.0, 0.0)
    s = spec.effective_scale
    obj = geometry.object_in_mask(inp.source, inp.mask)  # a loose mask's margin stays put
    cx, cy = geometry.bbox_center(inp.mask)
    ox, oy = geometry.bbox_center(obj)
    at = (cx + s * (ox - cx) + dx, cy + s * (oy - cy) + dy)  # the mask's centre anchors the scale
    placed, placed_mask = geometry.place_reference(inp.source, obj, s, at, inp.source.shape[:2])
    vacated = geometry.fill_from_rim(inp.source, geometry.dilate(obj, 1))
    moved = np.where(placed_mask[..., None], placed, vacated)
    region_w = geometry.dilate(frame.mask_to_work(inp.mask | inp.target_mask), grids.blend_margin())
    copy_work = over_source(frame, inp, moved, region_w)
    return copy_plan(spec, grids, dev, copy_work, region_w)


def paste_plan(
    spec: Spec, inp: EditInputs, frame: Frame, grids: Grids, dev: torch.device
) -> EditPlan:
    """Paste the object found inside the reference's mask (a loose box would paste its margin's
    background too), with no blending margin: the reference's surroundings are not the source's.
    `paste_method: copy` pastes it into the source; `composite` reads the placed reference."""
    assert inp.reference is not None and inp.reference_mask is not None and spec.at is not None
    ref_obj = geometry.object_in_mask(inp.reference, inp.reference_mask)
    composite = spec.guidance.paste_method == "composite"
    # a copy's object edge is resampled from its own colours, not the reference's background
    ref = inp.reference if composite else geometry.extend_colours(inp.reference, ref_obj, 3)
    placed, placed_mask = geometry.place_reference(
        ref, ref_obj, spec.effective_scale, (spec.at[0], spec.at[1]), inp.source.shape[:2]
    )
    region_w = frame.mask_to_work(placed_mask)
    if composite:
        return copy_plan(spec, grids, dev, frame.image_to_work(placed), region_w, composite=True)
    return copy_plan(spec, grids, dev, over_source(frame, inp, placed, region_w), region_w)


def recolour_plan(
    spec: Spec, inp: EditInputs, frame: Frame, grids: Grids, dev: torch.device
) -> EditPlan:
    """Appearance from an image-space copy: the object found in the mask, its colours transferred
    from the object found in the reference's mask (`geometry.transfer_colors`). The object keeps
    its own outline, which feature-pooled appearance guidance can trade for the reference's; the
    reference's texture does not come through, only its colours."""
    assert inp.reference is not None and inp.reference_mask is not None and inp.mask is not None
    src_obj = geometry.object_in_mask(inp.source, inp.mask)
    ref_obj = geometry.object_in_mask(inp.reference, inp.reference_mask)
    recoloured = geometry.transfer_colors(inp.source, src_obj, inp.reference, ref_obj)
    region_w = geometry.dilate(frame.mask_to_work(src_obj), grids.blend_margin())
    copy_work = over_source(frame, inp, recoloured, region_w)
    return copy_plan(spec, grids, dev, copy_work, region_w)
