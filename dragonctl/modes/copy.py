"""Generation from a pixel-aligned copy: move's and resize's object moved (and scaled) over the
source, paste's placed reference, appearance's object recoloured like the reference, and drag's
handle parts dragged.

The copy is the source with the wanted content in a region, and the bank holds it in the source's
place. The whole generation starts from the copy's inverted noise and reads the copy's K/V; the
region's features are guided to the copy's, cell by cell, and the rest keeps the copy's (there,
the source's). Paste's `composite` method (the reference's) instead starts only the region from
the placed reference's noise (a second bank image), over the source's, and reads the reference's
K/V there, the source's elsewhere.
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
    """The plan of a copy (working size) that is the source outside `region_w`: the bank holds
    the copy in the source's place, and the generation starts from its noise, reads its K/V and
    is guided to its features in the region and kept at them elsewhere.

    The copy's noise and K/V, not the source's, outside the region too: inverted noise is not
    local (the source's around a recoloured object still encodes its old colour), and at coarse
    layers the cells the region half-covers would carry the source's K/V; both dissolved copied
    objects into speckle. So the source is not inverted at all.

    With `composite` (paste's reference method) the copy is right only inside the region: it is
    a second bank image, the region starts from its noise over the source's and reads its K/V,
    the rest the source's."""
    g = spec.guidance
    region_f = grids.feature(region_w)
    region_idx = cells(region_f, dev)
    keep = cells(~region_f, dev)
    copy = 1 if composite else 0  # the copy's bank image
    region_lat = latent_mask(grids.latent(region_w))

    def edit_energy(cur, refs):
        return energies.copy_edit_energy(cur, refs[copy], region_idx, g.w_edit)

    def content_energy(cur, refs):
        return energies.content_energy(cur, refs[0], keep, g.w_content)

    def init_latent(z_first: torch.Tensor, z_copy: torch.Tensor | None) -> torch.Tensor:
        if not composite:
            return z_first.clone()
        assert z_copy is not None
        return torch.where(region_lat.to(z_first.device), z_copy, z_first)

    if composite:
        attention = BankAttention(
            "composite",
            base_keep=~region_w,
            ref_keep=region_w,
            query_region=region_w if g.regional_attention else None,
        )
        held = {"second_image": copy_work}
    else:
        attention = BankAttention("replace")
        held = {"bank_source": copy_work}
    return plan_on(
        grids, spec.mode, attention, region_lat, edit_energy, content_energy, init_latent, **held
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
    about its box centre), over the source with the object's old place painted from its
    surroundings (`geometry.fill_from_rim`). A small resize moves the outline by less than a
    latent cell, which correspondence guidance barely moves; the copy resamples the object
    exactly. A move starts the object where it goes, in its own colours, where correspondence
    guidance must draw it there. Only the object moves: neighbours inside a loose mask stay."""
    assert inp.mask is not None and inp.target_mask is not None
    dx, dy = spec.offset or (0.0, 0.0)
    s = spec.effective_scale
    obj = geometry.object_in_mask(inp.source, inp.mask)  # a loose mask's margin stays put
    ox, oy = geometry.bbox_center(obj)
    # about the object's own box centre: a loose mask's centre is wherever the user's margin puts it
    at = (ox + dx, oy + dy)
    # the object's edge is resampled from its own colours, not the background it leaves
    own = geometry.extend_colours(inp.source, obj, 3)
    placed, placed_mask = geometry.place_reference(own, obj, s, at, inp.source.shape[:2])
    vacated = geometry.fill_from_rim(inp.source, geometry.dilate(obj, 1))
    moved = np.where(placed_mask[..., None], placed, vacated)
    changed = inp.mask | inp.target_mask | placed_mask
    region_w = geometry.dilate(frame.mask_to_work(changed), grids.blend_margin())
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


def drag_copy_plan(
    spec: Spec, inp: EditInputs, frame: Frame, grids: Grids, dev: torch.device
) -> EditPlan:
    """Drag from an image-space copy: in the editable region, the part of the object under each
    handle dragged to its target (`geometry.drag_copy`, one point after the other), so the part
    moves rigidly and a region's edge that cuts the object stretches it. Handle features guided
    to their targets smeared the object into speckle and stopped it short on the shapes model."""
    assert inp.mask is not None
    dragged, changed = inp.source, np.zeros(inp.mask.shape, dtype=bool)
    for handle, target in inp.points:
        if tuple(handle) == tuple(target):
            continue  # a zero-length drag moves nothing
        dragged, moved = geometry.drag_copy(dragged, inp.mask, tuple(handle), tuple(target))
        changed |= moved
    if not changed.any():  # no part under any handle: the copy is the source
        changed = inp.mask
    region_w = geometry.dilate(frame.mask_to_work(changed), grids.blend_margin())
    return copy_plan(spec, grids, dev, over_source(frame, inp, dragged, region_w), region_w)
