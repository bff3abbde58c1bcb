"""Energies on hand-made features: each decreases along its own negative gradient, and degenerate
inputs (empty sets, zero-length drags) give finite values."""

from __future__ import annotations

import pytest
import torch

from dragonctl import energies as E


def feats(seed: int, c: int = 8, h: int = 6, w: int = 7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(c, h, w, generator=g), torch.randn(c * 2, h, w, generator=g)]


def descend(fn, cur, steps: int = 5, lr: float = 0.5) -> list[float]:
    cur = [f.clone().requires_grad_(True) for f in cur]
    values = []
    for _ in range(steps):
        e = fn(cur)
        values.append(float(e.detach()))
        grads = torch.autograd.grad(e, cur)
        with torch.no_grad():
            for f, g in zip(cur, grads):
                f -= lr * g / (g.norm() + 1e-12)
    return values


def mask(h=6, w=7, cells=()) -> torch.Tensor:
    """The flat cell indices of the given (y, x) cells, as plans pass them."""
    m = torch.zeros(h, w, dtype=torch.bool)
    for y, x in cells:
        m[y, x] = True
    return E.cells(m)


CASES = {
    "move_edit": lambda ref: (
        lambda cur: E.move_edit_energy(
            cur, ref, torch.tensor([10, 11, 17]), torch.tensor([0, 1, 7]), 4.0
        )
    ),
    "move_content": lambda ref: (
        lambda cur: E.move_content_energy(
            cur,
            ref,
            mask(cells=[(5, 5), (5, 6), (4, 6)]),
            mask(cells=[(0, 0), (0, 1)]),
            mask(cells=[(5, 5), (5, 6)]),
            6.0,
            0.2,
            0.8,
        )
    ),
    "drag_edit": lambda ref: (
        lambda cur: E.drag_edit_energy(
            cur,
            ref,
            [E.drag_pair(torch.tensor([0, 1, 7, 8]), torch.tensor([2, 3, 9, 10]))],
            4.0,
            0.2,
        )
    ),
    "content": lambda ref: (
        lambda cur: E.content_energy(cur, ref, mask(cells=[(3, 3), (4, 4)]), 6.0)
    ),
    "appearance_edit": lambda ref: (
        lambda cur: E.appearance_edit_energy(
            cur,
            ref,
            feats(5),
            mask(cells=[(1, 1), (1, 2)]),
            mask(cells=[(4, 4), (5, 5)]),
            mask(cells=[(1, 1), (1, 2), (2, 1)]),
            3.5,
            1.0,
        )
    ),
    "structure": lambda ref: (
        lambda cur: E.structure(cur, ref, mask(cells=[(1, 1), (1, 2), (2, 1), (2, 2)]), 1.0)
    ),
    "paste_edit": lambda ref: (
        lambda cur: E.paste_edit_energy(cur, ref, mask(cells=[(2, 2), (2, 3), (3, 2)]), 4.0)
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_energy_decreases_along_its_negative_gradient(name):
    ref = feats(1)
    values = descend(CASES[name](ref), feats(2))
    assert all(b < a for a, b in zip(values, values[1:])), values


def test_matching_features_minimise_the_match_energies():
    ref = feats(3)
    idx = torch.tensor([3, 4, 5])
    assert float(E.local_match(ref, ref, idx, idx, 4.0)) == pytest.approx(
        2 * 4.0 / 5.0
    )  # s̃ = 1 on both layers
    assert float(
        E.local_match(ref, ref, idx, idx, 4.0, raw=True, layer_weight=0.5)
    ) == pytest.approx(2 * 0.5 * 4.0 / 5)
    worse = float(E.local_match(feats(4), ref, idx, idx, 4.0))
    assert worse > 1.6


def test_move_edit_pairs_cells_through_the_index_map():
    ref = feats(5)
    cur = [f.clone() for f in ref]
    # put the source cells' features at the target cells: the energy reaches its minimum
    src, tgt = torch.tensor([0, 1, 2]), torch.tensor([30, 31, 32])
    for f, r in zip(cur, ref):
        f.flatten(1)[:, tgt] = r.flatten(1)[:, src]
    assert float(E.move_edit_energy(cur, ref, tgt, src, 4.0)) == pytest.approx(2 * 0.5 * 4.0 / 5)


def test_raw_cosine_denominator_never_reaches_zero():
    ref = feats(6)
    anti = [-f for f in ref]
    idx = torch.arange(10)
    e = E.move_edit_energy(anti, ref, idx, idx, 4.0)
    assert torch.isfinite(e) and float(e) == pytest.approx(
        2 * 0.5 * 4.0 / (1 + 4 * E.RAW_COS_FLOOR)
    )


def test_degenerate_sets_are_finite_and_zero():
    ref, cur = feats(7), feats(8)
    empty = torch.tensor([], dtype=torch.long)
    assert float(E.local_match(cur, ref, empty, empty, 4.0)) == 0.0
    assert float(E.contrast(cur, ref, empty, 1.0)) == 0.0
    assert float(E.drag_edit_energy(cur, ref, [], 4.0, 0.2)) == 0.0
    assert float(E.global_match(cur, ref, mask(), mask(cells=[(1, 1)]), 2.0)) == 0.0
    # fully overlapping handle and target patches: no contrast cells, no NaN
    same = torch.tensor([0, 1, 7, 8])
    e = E.drag_edit_energy(cur, ref, [E.drag_pair(same, same)], 4.0, 0.2)
    assert torch.isfinite(e) and float(e) > 0


def test_drag_pair_vacates_only_the_handle_cells_the_target_leaves():
    handle, target, vacated = E.drag_pair(torch.tensor([0, 1, 7, 8]), torch.tensor([1, 2, 8, 9]))
    assert vacated.tolist() == [0, 7]
    assert E.cells(torch.tensor([[False, True], [True, False]])).tolist() == [1, 2]


def test_structure_sees_layout_not_appearance():
    """Two-cell-kind regions (an object on a background): new looks for both kinds, as unlike each
    other as before, keep the structure energy at zero; moving the object's boundary does not."""
    c, h, w = 8, 4, 4
    obj_a, bg_a, obj_b, bg_b = torch.eye(c)[:4] * torch.tensor([1.0, 2.0, 3.0, 0.5])[:, None]

    def scene(obj, bg, object_cells):
        f = bg[:, None, None].expand(c, h, w).clone()
        for y, x in object_cells:
            f[:, y, x] = obj
        return [f, f * 2]

    region = E.cells(torch.ones(h, w, dtype=torch.bool))
    src = scene(obj_a, bg_a, [(1, 1), (1, 2), (2, 1), (2, 2)])
    recoloured = scene(obj_b, bg_b, [(1, 1), (1, 2), (2, 1), (2, 2)])
    reshaped = scene(obj_a, bg_a, [(0, 0), (0, 1), (1, 0), (1, 1)])
    assert float(E.structure(recoloured, src, region, 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(E.structure(reshaped, src, region, 1.0)) > 0.1
    assert float(E.structure(reshaped, src, region, 0.0)) == 0.0


def test_spread_keeps_at_most_n_evenly_spaced_indices():
    idx = torch.arange(10, 110)
    assert E.spread(idx, 200) is idx
    sub = E.spread(idx, 5)
    assert sub.tolist() == [10, 35, 60, 84, 109]
