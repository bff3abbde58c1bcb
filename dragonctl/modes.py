"""Per-mode set-up: from a spec's inputs to an `EditPlan` on the model's grids.

A plan holds everything mode-specific the sampler needs: how the generation branch reads the memory
bank (replace, concatenate, composite), the initial latent (the mode's copy of inverted noise), the
edit and SDE masks on the latent grid, and the edit/content energies closed over their index maps.

Grids for a working size H×W and latent factor f: latent (H/f)×(W/f); features twice that, i.e.
cells of f/2 pixels (H/4 × W/4 for SD). Geometry is computed in working pixels, then per grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dragonctl import energies, geometry
from dragonctl.features import FEATURE_UPSCALE
from dragonctl.geometry import Frame
from dragonctl.inputs import EditInputs
from dragonctl.spec import Spec

Energy = Callable[[energies.Features, list[energies.Features]], torch.Tensor]


@dataclass
class Grids:
    work_hw: tuple[int, int]
    latent_factor: int

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.work_hw[0] // self.latent_factor, self.work_hw[1] // self.latent_factor

    @property
    def feature_hw(self) -> tuple[int, int]:
        h, w = self.latent_hw
        return h * FEATURE_UPSCALE, w * FEATURE_UPSCALE

    @property
    def feature_cell(self) -> float:
        return self.latent_factor / FEATURE_UPSCALE

    def latent(self, mask: np.ndarray, touch: bool = True) -> torch.Tensor:
        return torch.from_numpy(geometry.grid_mask(mask, *self.latent_hw, touch=touch))

    def latent_core(self, mask: np.ndarray) -> torch.Tensor:
        """Latent cells at least half inside the mask (the cells it touches when there are none)."""
        return torch.from_numpy(_half_covered(mask, self.latent_hw))

    def feature(self, mask: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(_half_covered(mask, self.feature_hw))


def _half_covered(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    m = geometry.grid_mask(mask, *hw)
    if not m.any() and mask.any():  # an object smaller than half a cell: keep the cells it touches
        m = geometry.grid_mask(mask, *hw, touch=True)
    return m


@dataclass
class EditPlan:
    mode: str
    bank_mode: str  # replace | concat | composite
    edit_latent_mask: torch.Tensor  # h×w bool: where the edit gradient applies
    sde_latent_mask: torch.Tensor  # h×w bool: where DiffEditor's SDE uses the inside strength
    edit_energy: Energy
    content_energy: Energy
    init_latent: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (z_T source, z_T reference)
    reference_work: np.ndarray | None = None  # the placed reference image at working size
    composite_base_keep: np.ndarray | None = None  # working-size masks for the composite K/V
    composite_ref_keep: np.ndarray | None = None
    target_work: np.ndarray | None = None  # where the object should end up (working pixels)


def place_reference(ref: np.ndarray, ref_mask: np.ndarray, scale: float, at: tuple[float, float],
                    out_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Warp the reference so its object's box centre lands at `at`, scaled by `scale` (aspect kept).

    Returns the placed image (the reference's mean colour outside it) and the placed object mask,
    both in the destination's pixels. Pixel p samples the reference at c + (p - at)/scale.
    """
    c = geometry.bbox_center(ref_mask)
    h, w = out_hw
    a = 1.0 / scale
    # PIL maps output (x, y) → input (a·x + c0, a·y + c1) in pixel-edge coordinates.
    data = (a, 0.0, c[0] - at[0] * a, 0.0, a, c[1] - at[1] * a)
    fill = tuple(int(v) for v in ref.reshape(-1, 3).mean(axis=0))
    img = Image.fromarray(ref).transform((w, h), Image.Transform.AFFINE, data, Image.Resampling.BICUBIC, fillcolor=fill)
    mask = geometry.warp_mask(ref_mask, scale, c, at, out_hw)
    return np.asarray(img), mask


def _warp_latent(z: torch.Tensor, src_mask: torch.Tensor, scale: float, center: tuple[float, float],
                 dest: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy of z where each cell takes the source cell it comes from, where that cell is in src_mask."""
    h, w = z.shape[-2:]
    iy, ix = geometry.warp_index((h, w), (h, w), scale, center, dest)
    iy_t, ix_t = torch.from_numpy(iy), torch.from_numpy(ix)
    valid = iy_t >= 0
    take = torch.zeros((h, w), dtype=torch.bool)
    take[valid] = src_mask[iy_t[valid], ix_t[valid]]
    out = z.clone()
    out[..., take] = z[..., iy_t[take], ix_t[take]]
    return out, take


def build_plan(spec: Spec, inp: EditInputs, frame: Frame, latent_factor: int,
               device: torch.device | str = "cpu") -> EditPlan:
    """The mode's plan; the energies' cell indices are put on `device` (the features' device) here, once."""
    grids = Grids((frame.work_h, frame.work_w), latent_factor)
    dev = torch.device(device)
    if spec.mode == "move" or (spec.mode == "resize" and spec.guidance.resize_method == "correspondence"):
        return _move_plan(spec, inp, frame, grids, dev)
    if spec.mode == "resize":
        return _scaled_copy_plan(spec, inp, frame, grids, dev)
    if spec.mode == "drag":
        return _drag_plan(spec, inp, frame, grids, dev)
    if spec.mode == "paste":
        return _paste_plan(spec, inp, frame, grids, dev)
    return _appearance_plan(spec, inp, frame, grids, dev)


def _move_plan(spec: Spec, inp: EditInputs, frame: Frame, grids: Grids, dev: torch.device) -> EditPlan:
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
    iy, ix = geometry.warp_index((hf, wf), (hf, wf), s, (c_w[0] / cell, c_w[1] / cell),
                                 (dest_w[0] / cell, dest_w[1] / cell))
    valid = iy >= 0
    tgt_f = np.zeros((hf, wf), dtype=bool)
    tgt_f[valid] = obj_f.numpy()[iy[valid], ix[valid]]
    target_idx = torch.from_numpy(np.flatnonzero(tgt_f)).to(dev)
    source_idx = torch.from_numpy((iy * wf + ix).flatten()[np.flatnonzero(tgt_f)]).to(dev)
    tgt_f_t = torch.from_numpy(tgt_f)
    unchanged = energies.cells(~(tgt_f_t | obj_f), dev)
    vacated = energies.cells(obj_f & ~tgt_f_t, dev)
    fill = energies.cells(grids.feature(frame.mask_to_work(inp.fill_region)), dev) if inp.fill_region is not None \
        else unchanged

    def edit_energy(cur, refs):
        return energies.move_edit_energy(cur, refs[0], target_idx, source_idx, g.w_edit)

    def content_energy(cur, refs):
        return energies.move_content_energy(cur, refs[0], unchanged, vacated, fill, g.w_content, g.w_contrast,
                                            g.w_inpaint)

    lf = grids.latent_factor
    obj_lat = grids.latent(obj_w)

    def init_latent(z_src: torch.Tensor, _z_ref: torch.Tensor | None) -> torch.Tensor:
        out, _ = _warp_latent(z_src, obj_lat, s, (c_w[0] / lf, c_w[1] / lf), (dest_w[0] / lf, dest_w[1] / lf))
        return out

    return EditPlan(
        mode=spec.mode, bank_mode="replace",
        edit_latent_mask=grids.latent(target_w), sde_latent_mask=grids.latent(target_w | obj_w),
        edit_energy=edit_energy, content_energy=content_energy, init_latent=init_latent, target_work=target_w)


def patch_indices(x: float, y: float, cell: float, hw: tuple[int, int]) -> torch.Tensor:
    """Flat indices of the 3×3 cells centred on the cell holding (x, y), clipped inside the grid."""
    h, w = hw
    cy = min(max(int(y // cell), 1), h - 2)
    cx = min(max(int(x // cell), 1), w - 2)  # the reference clipped x by the height (bug); we use the width
    return torch.tensor([(cy + dy) * w + (cx + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])


def _drag_plan(spec: Spec, inp: EditInputs, frame: Frame, grids: Grids, dev: torch.device) -> EditPlan:
    g = spec.guidance
    assert inp.mask is not None
    region_w = frame.mask_to_work(inp.mask)
    cell = grids.feature_cell
    pairs = []
    work_pairs = []
    for (hx, hy), (tx, ty) in inp.points:
        if (hx, hy) == (tx, ty):
            continue  # zero-length: nothing to move (the reference produced NaN here)
        h_w, t_w = frame.to_work(hx, hy), frame.to_work(tx, ty)
        work_pairs.append((h_w, t_w))
        pair = energies.drag_pair(patch_indices(*h_w, cell, grids.feature_hw), patch_indices(*t_w, cell, grids.feature_hw))
        pairs.append(tuple(t.to(dev) for t in pair))
    keep = energies.cells(~grids.feature(region_w), dev)

    def edit_energy(cur, refs):
        return energies.drag_edit_energy(cur, refs[0], pairs, g.w_edit, g.w_inpaint)

    def content_energy(cur, refs):
        return energies.content_energy(cur, refs[0], keep, g.w_content, layer_weight=0.5)

    lf = grids.latent_factor
    lat_hw = grids.latent_hw

    def init_latent(z_src: torch.Tensor, _z_ref: torch.Tensor | None) -> torch.Tensor:
        out = z_src.clone()  # a copy: the reference wrote into the bank's own z_T (bug)
        for h_w, t_w in work_pairs:
            src = patch_indices(*h_w, lf, lat_hw)
            dst = patch_indices(*t_w, lf, lat_hw)
            flat_out = out.view(*out.shape[:-2], -1)
            flat_out[..., dst] = z_src.reshape(*z_src.shape[:-2], -1)[..., src]
        return out

    region_lat = grids.latent(region_w)
    return EditPlan(mode="drag", bank_mode="concat", edit_latent_mask=region_lat, sde_latent_mask=region_lat,
                    edit_energy=edit_energy, content_energy=content_energy, init_latent=init_latent)


def _copy_plan(spec: Spec, grids: Grids, dev: torch.device, reference_work: np.ndarray,
               region_w: np.ndarray) -> EditPlan:
    """Generation from a copy: `reference_work` (a second bank image, pixel-aligned with the source)
    holds the wanted content in `region_w`. The region starts from the copy's inverted noise, reads its
    K/V (the source's elsewhere: composite), and its features are guided to the copy's, cell by cell."""
    g = spec.guidance
    region_f = grids.feature(region_w)
    region_idx = energies.cells(region_f, dev)
    keep = energies.cells(~region_f, dev)

    def edit_energy(cur, refs):
        return energies.paste_edit_energy(cur, refs[1], region_idx, g.w_edit)

    def content_energy(cur, refs):
        return energies.content_energy(cur, refs[0], keep, g.w_content)

    region_lat = grids.latent(region_w)

    def init_latent(z_src: torch.Tensor, z_ref: torch.Tensor | None) -> torch.Tensor:
        assert z_ref is not None
        return torch.where(region_lat.to(z_src.device), z_ref, z_src)

    return EditPlan(mode=spec.mode, bank_mode="composite", edit_latent_mask=region_lat, sde_latent_mask=region_lat,
                    edit_energy=edit_energy, content_energy=content_energy, init_latent=init_latent,
                    reference_work=reference_work, composite_base_keep=~region_w, composite_ref_keep=region_w,
                    target_work=region_w)


def _blend_margin(grids: Grids) -> int:
    """Working pixels of surroundings a copied region takes along (half a latent cell), so its edges
    blend in the latent rather than cut through a cell."""
    return max(1, grids.latent_factor // 2)


def _scaled_copy_plan(spec: Spec, inp: EditInputs, frame: Frame, grids: Grids, dev: torch.device) -> EditPlan:
    """Resize from an image-space copy: the source scaled about the object (and offset) is the second
    bank image over the old and new places of the object. A small resize moves the outline by less
    than a latent or feature cell, where correspondence guidance barely moves it; an image-space copy
    resamples the object exactly and the generation blends it in."""
    assert inp.mask is not None and inp.target_mask is not None
    dx, dy = spec.offset or (0.0, 0.0)
    cx, cy = geometry.bbox_center(inp.mask)
    scaled, _ = place_reference(inp.source, inp.mask, spec.effective_scale, (cx + dx, cy + dy), inp.source.shape[:2])
    region_w = geometry.dilate(frame.mask_to_work(inp.mask | inp.target_mask), _blend_margin(grids))
    copy = np.where(region_w[..., None], frame.image_to_work(scaled), frame.image_to_work(inp.source))
    return _copy_plan(spec, grids, dev, copy, region_w)


def _paste_plan(spec: Spec, inp: EditInputs, frame: Frame, grids: Grids, dev: torch.device) -> EditPlan:
    assert inp.reference is not None and inp.reference_mask is not None and spec.at is not None
    # A loosely drawn mask (a box with a margin) would paste its margin's background too: the plan
    # takes the object found inside it (a tight mask stays as it is). No blending margin here, unlike
    # resize's copy: the reference's surroundings are not the source's (on 12 shapes cases a 2-px
    # margin cost up to 8 dB of background in some and moved the median IoU within noise).
    ref_obj = geometry.object_in_mask(inp.reference, inp.reference_mask)
    placed, placed_mask = place_reference(inp.reference, ref_obj, spec.effective_scale, (spec.at[0], spec.at[1]),
                                          inp.source.shape[:2])
    return _copy_plan(spec, grids, dev, frame.image_to_work(placed), frame.mask_to_work(placed_mask))


def transfer_statistics(z: torch.Tensor, region: torch.Tensor, z_ref: torch.Tensor, ref_region: torch.Tensor,
                        eps: float = 1e-5) -> torch.Tensor:
    """Copy of z whose cells in `region` take, channel by channel, the mean and spread z_ref has in
    `ref_region` (AdaIN on the inverted noise): the region starts from the reference's colours and
    keeps its own layout (each cell's standardised value). Regions are h×w boolean masks."""
    out = z.clone()
    a, b = z[..., region], z_ref[..., ref_region]

    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sd = x.std(-1, keepdim=True) if x.shape[-1] > 1 else torch.ones_like(x[..., :1])
        return x.mean(-1, keepdim=True), sd

    (mu_a, sd_a), (mu_b, sd_b) = stats(a), stats(b)
    out[..., region] = (a - mu_a) / (sd_a + eps) * sd_b + mu_b
    return out


def _appearance_plan(spec: Spec, inp: EditInputs, frame: Frame, grids: Grids, dev: torch.device) -> EditPlan:
    assert inp.reference is not None and inp.reference_mask is not None and inp.mask is not None
    g = spec.guidance
    # Mean-pooled over a loosely drawn mask, the statistics would mix its margin's background into the
    # object's: both sides pool over the object found inside their masks (tight masks stay as they are).
    ref_obj = geometry.object_in_mask(inp.reference, inp.reference_mask)
    src_obj = geometry.object_in_mask(inp.source, inp.mask)
    scale = math.sqrt(src_obj.sum() / ref_obj.sum())
    placed, placed_mask = place_reference(inp.reference, ref_obj, scale, geometry.bbox_center(src_obj),
                                          inp.source.shape[:2])
    ref_obj_w = frame.mask_to_work(placed_mask)
    obj_w = frame.mask_to_work(src_obj)
    obj_f = grids.feature(obj_w)
    obj_idx = energies.cells(obj_f, dev)
    ref_idx = energies.cells(grids.feature(ref_obj_w), dev)
    keep = energies.cells(~obj_f, dev)
    structure_idx = energies.spread(obj_idx, energies.STRUCTURE_CELLS)

    def edit_energy(cur, refs):
        return energies.appearance_edit_energy(cur, refs[1], refs[0], obj_idx, ref_idx, structure_idx, g.w_edit,
                                               g.w_structure)

    def content_energy(cur, refs):
        return energies.content_energy(cur, refs[0], keep, g.w_content)

    obj_lat = grids.latent(obj_w)
    obj_core, ref_core = grids.latent_core(obj_w), grids.latent_core(ref_obj_w)

    def init_latent(z_src: torch.Tensor, z_ref: torch.Tensor | None) -> torch.Tensor:
        if g.appearance_init == "source":
            return z_src.clone()
        assert z_ref is not None
        return transfer_statistics(z_src, obj_core.to(z_src.device), z_ref, ref_core.to(z_src.device))

    return EditPlan(mode=spec.mode, bank_mode="composite", edit_latent_mask=obj_lat, sde_latent_mask=obj_lat,
                    edit_energy=edit_energy, content_energy=content_energy, init_latent=init_latent,
                    reference_work=frame.image_to_work(placed), composite_base_keep=~obj_w,
                    composite_ref_keep=_interior(ref_obj_w, grids.latent_factor), target_work=obj_w)


def _interior(mask_w: np.ndarray, pixels: int) -> np.ndarray:
    """The mask less a border of `pixels` (the whole mask when nothing would be left).

    Appearance reads the reference object's K/V from its interior: its border tokens carry its outline,
    which the recoloured object took on (12 shapes cases, shape IoU with the source object: 0.17 reading
    the whole object, 0.27 without one latent cell of border, 0.20 without two; colour unchanged)."""
    inner = geometry.erode(mask_w, pixels)
    return inner if inner.any() else mask_w
