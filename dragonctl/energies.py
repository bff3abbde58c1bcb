"""Energies: pure functions of decoder features and masks. Lower energy = closer to the wanted edit.

Every term has DragonDiffusion's shape w / (1 + 4·S) for a similarity S, plus linear "contrast"
terms. Features are lists (one entry per feature stage) of C×H×W fp32 tensors on one common grid;
cell sets are flat index tensors into H·W, so local terms pair cells through explicit index maps
rather than the reference's raster-order pairing (which is right only for exact translates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Features = list[torch.Tensor]  # each C×H×W

# The reference uses raw cosine in move's edit and content terms, where 1 + 4·cos reaches zero at
# cos = -0.25 and the energy explodes. We keep raw cosine (it sets the gradient's scale the defaults
# were tuned for) but clamp the mean at this floor so the denominator stays ≥ 0.2.
RAW_COS_FLOOR = -0.2


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Channel-wise cosine similarity of C×K feature sets → K."""
    return F.cosine_similarity(a, b, dim=0, eps=1e-6)


def shifted_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """s̃ = (cos + 1) / 2 ∈ [0, 1]."""
    return (cosine(a, b) + 1.0) / 2.0


def _cells(f: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return f.flatten(1)[:, idx]


def local_match(
    cur: Features,
    ref: Features,
    cur_idx: torch.Tensor,
    ref_idx: torch.Tensor,
    weight: float,
    raw: bool = False,
    layer_weight: float = 1.0,
) -> torch.Tensor:
    """Σ_f layer_weight·w / (1 + 4·mean_k S(cur[cur_idx_k], ref[ref_idx_k])): content at ref_idx
    should appear at cur_idx."""
    total = cur[0].new_zeros(())
    if cur_idx.numel() == 0 or weight == 0:
        return total
    for fc, fr in zip(cur, ref):
        a, b = _cells(fc, cur_idx), _cells(fr, ref_idx)
        s = cosine(a, b).mean().clamp(min=RAW_COS_FLOOR) if raw else shifted_cosine(a, b).mean()
        total = total + layer_weight * weight / (1.0 + 4.0 * s)
    return total


def global_match(
    cur: Features,
    ref: Features,
    cur_idx: torch.Tensor,
    ref_idx: torch.Tensor,
    weight: float,
    layer_weight: float = 1.0,
) -> torch.Tensor:
    """Σ_f w / (1 + 4·s̃(mean of cur over cur_idx, mean of ref over ref_idx)): appearance."""
    total = cur[0].new_zeros(())
    if weight == 0 or cur_idx.numel() == 0 or ref_idx.numel() == 0:
        return total
    for fc, fr in zip(cur, ref):
        a = _cells(fc, cur_idx).mean(dim=1, keepdim=True)
        b = _cells(fr, ref_idx).mean(dim=1, keepdim=True)
        total = total + layer_weight * weight / (1.0 + 4.0 * shifted_cosine(a, b).mean())
    return total


def contrast(
    cur: Features, ref: Features, idx: torch.Tensor, weight: float, layer_weight: float = 1.0
) -> torch.Tensor:
    """Σ_f w·mean s̃(cur, ref) over cells: penalises content that stays where it should leave."""
    total = cur[0].new_zeros(())
    if idx.numel() == 0 or weight == 0:
        return total
    for fc, fr in zip(cur, ref):
        total = (
            total + layer_weight * weight * shifted_cosine(_cells(fc, idx), _cells(fr, idx)).mean()
        )
    return total


# The structure term compares cell-by-cell similarity matrices: at most this many cells (evenly
# spread over the region) keep them small (1024² entries per stage) on any image size.
STRUCTURE_CELLS = 1024


def self_similarity(f: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between every pair of cells of a C×K feature set → K×K."""
    n = F.normalize(f, dim=0, eps=1e-6)
    return n.T @ n


def structure(cur: Features, ref: Features, idx: torch.Tensor, weight: float) -> torch.Tensor:
    """Σ_f w·mean |SS(cur[idx]) − SS(ref[idx])|: the region keeps its layout (which of its cells
    look alike: the object's cells one another, unlike the background's). It depends on how alike
    cells are, not on what they look like, so it holds the shape while the appearance term recolours
    it."""
    total = cur[0].new_zeros(())
    if idx.numel() < 2 or weight == 0:
        return total
    for fc, fr in zip(cur, ref):
        total = (
            total
            + weight
            * (self_similarity(_cells(fc, idx)) - self_similarity(_cells(fr, idx))).abs().mean()
        )
    return total


def spread(idx: torch.Tensor, n: int) -> torch.Tensor:
    """At most n of the indices, evenly spaced (all of them when there are fewer)."""
    if idx.numel() <= n:
        return idx
    return idx[torch.linspace(0, idx.numel() - 1, n, device=idx.device).round().long()]


def cells(mask: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """A mask's flat cell indices, on the device the features live on.

    Plans convert their masks once, before the loop: a boolean mask or a host index inside the loop
    would cost a device sync (or a host→device copy) on every guided step.
    """
    return mask.flatten().nonzero().flatten().to(device)


def drag_pair(
    handle: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(handle, target, vacated): the handle cells the target does not cover are vacated."""
    return handle, target, handle[~torch.isin(handle, target)]


# --- per mode ------------------------------------------------------------------------------------


def move_edit_energy(
    cur: Features, ref: Features, target_idx: torch.Tensor, source_idx: torch.Tensor, w_edit: float
) -> torch.Tensor:
    """The object's features (at source_idx in the source) should appear at target_idx."""
    return local_match(cur, ref, target_idx, source_idx, w_edit, raw=True, layer_weight=0.5)


def move_content_energy(
    cur: Features,
    ref: Features,
    unchanged: torch.Tensor,
    vacated: torch.Tensor,
    fill: torch.Tensor,
    w_content: float,
    w_contrast: float,
    w_inpaint: float,
) -> torch.Tensor:
    """Keep the unchanged cells, make the vacated cells stop looking like the object and look like
    `fill`."""
    e = local_match(cur, ref, unchanged, unchanged, w_content, raw=True, layer_weight=0.5)
    e = e + contrast(cur, ref, vacated, w_contrast, layer_weight=0.5)
    return e + global_match(cur, ref, vacated, fill, w_inpaint)


def drag_edit_energy(
    cur: Features,
    ref: Features,
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    w_edit: float,
    w_inpaint: float,
) -> torch.Tensor:
    """Each handle patch's features should appear at its target patch; the handle's old place should
    change.

    `pairs` are (handle, target, vacated) cell sets (`drag_pair`). Zero-length pairs are skipped by
    the caller; a pair whose patches overlap fully has no vacated cells and contributes only its
    match term (the reference produced NaN there).
    """
    total = cur[0].new_zeros(())
    if not pairs:
        return total
    n = len(pairs) * len(cur)
    for handle, target, vacated in pairs:
        total = total + local_match(cur, ref, target, handle, w_edit) / n
        total = total + contrast(cur, ref, vacated, w_inpaint) / n
    return total


def content_energy(
    cur: Features, ref: Features, keep: torch.Tensor, w_content: float, layer_weight: float = 1.0
) -> torch.Tensor:
    """Features at the kept cells (outside the edit) should stay those of the source."""
    return local_match(cur, ref, keep, keep, w_content, layer_weight=layer_weight)


def appearance_edit_energy(
    cur: Features,
    ref: Features,
    src: Features,
    object_idx: torch.Tensor,
    ref_idx: torch.Tensor,
    structure_idx: torch.Tensor,
    w_edit: float,
    w_structure: float,
) -> torch.Tensor:
    """The object's mean feature should be the reference object's (global, mean-pooled appearance),
    while its region keeps the source's layout (the structure term; mean pooling has no shape)."""
    return global_match(cur, ref, object_idx, ref_idx, w_edit) + structure(
        cur, src, structure_idx, w_structure
    )


def paste_edit_energy(
    cur: Features, placed: Features, region_idx: torch.Tensor, w_edit: float
) -> torch.Tensor:
    """The pasted region's features should be those of the reference placed there (pixel-aligned,
    so cells pair with themselves; the reference's local term)."""
    return local_match(cur, placed, region_idx, region_idx, w_edit)
