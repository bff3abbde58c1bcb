"""The benchmarks run (tiny sizes here; the real tables come from full runs) and their metrics are
right."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from dragonctl.bench import quality, speed, success
from dragonctl.cli import app
from dragonctl.errors import UsageError


@pytest.mark.parametrize(
    "size,world", [(64, "flat"), (128, "flat"), (64, "textured"), (128, "textured")]
)
@pytest.mark.parametrize("mode", quality.CASE_SETS)
def test_quality_metrics_are_perfect_on_the_ground_truth(mode, size, world):
    # 12 cases: the benchmark's own count, with backgrounds that pass through the object's colour
    for case in quality.make_cases(mode, 12, size=size, world=world):
        m = quality.score(case, case.truth)
        assert m["background_psnr"] == 99.0 and m["far_psnr"] == 99.0
        assert m.get("centroid_error", 0.0) < 0.01
        for key in ("iou", "shape_iou"):
            if key in m:
                assert m[key] == 1.0
        assert (
            m.get("residue", 0.0) == 0.0 and m.get("color_distance", 0.0) < 0.004
        )  # uint8 rounding
        assert m.get("area_ratio_error", 0.0) == 0.0
        assert m["area_error"] == 0.0 and m["stray"] == 0.0 and m["cleanliness"] == 1.0
        assert success.verdict(case.mode, m, case.source.shape[1]) == [], case.name


def test_cases_at_128_px_are_the_cases_at_64_drawn_finer():
    """The SD-like model's cases (its own 128 px): same scenes and edits, coordinates doubled;
    doing nothing still fails every one."""
    for mode in quality.MODES:
        for small, big in zip(quality.make_cases(mode, 6), quality.make_cases(mode, 6, size=128)):
            assert big.source.shape == (128, 128, 3) and big.spec["mode"] == mode
            c64, c128 = quality.centroid(small.new_mask), quality.centroid(big.new_mask)
            assert abs(2 * c64[0] - c128[0]) <= 1.5 and abs(2 * c64[1] - c128[1]) <= 1.5  # raster
            assert abs(big.new_mask.sum() / small.new_mask.sum() - 4) < 0.5
            if mode == "move":
                assert big.spec["offset"] == [2 * v for v in small.spec["offset"]]
            assert success.verdict(mode, quality.score(big, big.source), 128), big.name
    assert quality.case_size("shapes") == 64


def test_verdicts_name_what_failed():
    move = quality.make_cases("move", 4)
    for case in move:  # nothing happened: the object is where it was
        failed = success.verdict("move", quality.score(case, case.source), 64)
        assert "place" in failed and "copies" in failed
    case = move[0]
    twice = case.truth.copy()
    twice[case.old_mask & ~case.new_mask] = case.source[case.old_mask & ~case.new_mask]
    assert success.verdict("move", quality.score(case, twice), 64) == ["copies"]
    rng = np.random.default_rng(0)
    noisy = np.clip(case.truth + rng.normal(0, 12, case.truth.shape), 0, 255).astype(np.uint8)
    m = quality.score(case, noisy)
    assert "background" in success.verdict("move", m, 64) and m["cleanliness"] > 1.5
    for mode in ("appearance", "paste"):
        for case in quality.make_cases(mode, 2):
            failed = success.verdict(mode, quality.score(case, case.source), 64)
            assert ("shape" if mode == "appearance" else "overlap") in failed


def test_cases_draw_masks_the_ways_users_do(tmp_path):
    from dragonctl import api

    cases = quality.make_cases("move", 8) + quality.make_cases("drag", 4)
    kinds = set()
    for case in cases:
        ls, inp = api.load(quality.write_case(case, tmp_path / case.mode, "shapes"))
        mask = ls.spec.mask
        kinds.add("png" if mask.path else "box" if mask.box else "polygon" if mask.polygon else "")
        assert (inp.mask & case.old_mask).sum() == case.old_mask.sum()  # it holds the object
    assert kinds == {"png", "box", "polygon"}


def test_quality_metrics_see_an_edit_that_did_nothing():
    for case in quality.make_cases("move", 3):
        m = quality.score(case, case.source)
        assert m["residue"] == 1.0 and m["iou"] < 0.5 and m["centroid_error"] > 4


def test_an_outline_a_pixel_off_is_no_copy_left_behind():
    """A shrunk object rasterised a pixel larger than the truth's (a resampled copy can be) leaves
    no residue; the same object left whole at its old place does."""
    case = next(c for c in quality.make_cases("resize", 12) if c.spec["scale"] < 1)
    colour = (np.asarray(case.color) * 255).round().astype(np.uint8)
    a_pixel_off = case.truth.copy()
    a_pixel_off[quality._dilate(case.new_mask, 1)] = colour
    assert quality.score(case, a_pixel_off)["residue"] == 0.0
    left_whole = a_pixel_off.copy()
    left_whole[case.old_mask] = colour
    assert quality.score(case, left_whole)["residue"] > 0.5


def test_resize_that_did_nothing_is_not_scored_as_success():
    for case in quality.make_cases("resize", 4):
        m = quality.score(case, case.source)
        assert m["area_ratio_error"] > 0.2 and m["iou"] < 0.9


def test_cases_are_reproducible_and_held_out():
    a, b = quality.make_cases("paste", 2), quality.make_cases("paste", 2)
    assert all(np.array_equal(x.source, y.source) and x.spec == y.spec for x, y in zip(a, b))
    assert not np.array_equal(quality.make_cases("paste", 1, seed=7)[0].source, a[0].source)


def test_quality_benchmark_runs_through_the_real_engine(tmp_path):
    summary = quality.run(
        tmp_path,
        ("move", "appearance", "drag_part"),
        cases=1,
        spec_overrides={"steps": 6},
        log=lambda m: None,
    )
    assert (tmp_path / "quality.json").exists() and (tmp_path / "sheet_move.png").exists()
    assert (
        yaml.safe_load((tmp_path / "drag_part" / "drag_part-00.yaml").read_text())["mode"] == "drag"
    )
    for mode in ("move", "appearance", "drag_part"):
        s = summary["modes"][mode]
        assert (
            s["completed"] == 1
            and "background_psnr" in s["median"]
            and "background_psnr" in s["baseline_median"]
        )
    assert "| move | 1/1 |" in quality.table(summary)
    for mode in ("move", "appearance"):
        s = summary["modes"][mode]
        record = s["per_case"][0]
        assert record["success"] == (not record["failed"])
        assert (tmp_path / f"failures_{mode}.png").exists() == bool(record["failed"])
    assert "| move | " in quality.success_table(summary)

    from dragonctl.bench import contact

    before, after = contact.sheets([tmp_path], per_mode=1, scale=2)
    assert before.shape[0] == after.shape[0]  # a row per mode in both, of the same heights
    # each result is framed by its verdict, top-left corner of the first cell after the labels
    for k, mode in enumerate(("move", "appearance", "drag_part")):
        record = summary["modes"][mode]["per_case"][0]
        want = contact.SUCCESS if record["success"] else contact.FAILURE
        cell_h = (64 * 2 + 2 * contact.FRAME + contact.CAPTION_H) + contact.GAP
        assert tuple(after[k * cell_h, contact.LABEL_W]) == want
    with pytest.raises(UsageError, match="also in"):
        contact.sheets([tmp_path, tmp_path])
    r = CliRunner().invoke(app, ["bench", "sheets", str(tmp_path), "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s" / "before.png").exists() and (tmp_path / "s" / "after.png").exists()
    r = CliRunner().invoke(app, ["bench", "sheets", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "quality.json: not found" in r.output


def test_bench_quality_exits_0_when_every_case_ran_whatever_the_verdicts(tmp_path):
    from typer.testing import CliRunner

    from dragonctl.cli import app

    r = CliRunner().invoke(
        app,
        [
            "bench",
            "quality",
            str(tmp_path),
            "--cases",
            "1",
            "--mode",
            "drag",
            "--steps",
            "2",
            "--energy-scale",
            "0",
        ],
    )  # unguided: the dragged object stays, a failure
    assert r.exit_code == 0, r.output
    assert "| drag | 0/1 (0 %) | " in r.output and (tmp_path / "failures_drag.png").exists()


def test_bench_quality_without_the_baseline_scores_the_edit_alone(tmp_path):
    args = ["bench", "quality", "--cases", "1", "--mode", "move", "--steps", "2"]
    r = CliRunner().invoke(app, [*args, str(tmp_path / "off"), "--no-baseline"])
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if line.startswith("| move | "))
    assert row.split(" | ")[3] == "—"  # the baseline's column
    assert row.split(" | ")[2] in ("0/1", "1/1")  # the zero predictor's
    off = json.loads((tmp_path / "off" / "quality.json").read_text())["modes"]["move"]
    assert off["baseline_successes"] is None and off["baseline_median"] == {}
    assert off["per_case"][0]["baseline"] is None and off["median"]["background_psnr"] > 0
    r = CliRunner().invoke(app, [*args, str(tmp_path / "on")])
    on = json.loads((tmp_path / "on" / "quality.json").read_text())["modes"]["move"]
    assert on["median"] == off["median"] and "background_psnr" in on["baseline_median"]
    # the contact-sheet row loses the baseline's panel (64 px and its gap, at 3×)
    widths = [Image.open(tmp_path / d / "sheet_move.png").size[0] for d in ("on", "off")]
    assert widths[0] - widths[1] == (64 + 4) * 3


def test_speed_benchmark_runs_at_tiny_size_and_counts_passes(tmp_path):
    results = speed.run("tiny", (32,), ("move", "paste"), steps=6, device="cpu", log=lambda m: None)
    speed.save(results, tmp_path / "speed.json")
    runs = json.loads((tmp_path / "speed.json").read_text())["runs"]
    move = next(r for r in runs if r["mode"] == "move")
    # 6 inversion calls, 6 edit steps, 4 guided steps (i < 0.6·6), each two truncated forwards
    # (the bank's without grad, the edited latent's with) and two backwards (edit, content)
    assert (move["inversion_unet_calls"], move["unet_forward"], move["unet_backward"]) == (6, 20, 8)
    paste = next(r for r in runs if r["mode"] == "paste")
    assert paste["inversion_unet_calls"] == 12  # the source and the placed reference
    assert (move["bank_images"], paste["bank_images"]) == (1, 2)
    timed = {"total_s", "inversion_s", "editing_s", "re_edit_cached_s", "plain_eager_s", "warmup_s"}
    assert all(r["cuda_syncs_per_edit"] is None and timed <= set(r) for r in runs)
    assert "| 32 | move | dragondiffusion | recompute |" in speed.table(results)


@pytest.mark.slow  # torch.compile on the CPU: CI's second stage
def test_speed_benchmark_reports_compiled_rows_with_their_warm_up(tmp_path):
    results = speed.run(
        "tiny",
        (32,),
        ("move",),
        steps=4,
        device="cpu",
        log=lambda m: None,
        compiles=("off", "eager"),
    )
    eager, compiled = results["runs"]
    assert (eager["compile"], compiled["compile"]) == ("off", "eager")
    # the same schedule either way
    assert (compiled["unet_forward"], compiled["unet_backward"]) == (
        eager["unet_forward"],
        eager["unet_backward"],
    )


def test_speed_benchmark_batches_edits_of_one_source(tmp_path):
    """K edits per loop: each edit's row-passes fall with K (the bank rows are shared)."""
    out = tmp_path / "batch.json"
    result = CliRunner().invoke(
        app,
        ["bench", "speed", "--size", "tiny", "--resolution", "32", "--mode", "move", "--steps",
         "6", "--device", "cpu", "--batch", "1", "--batch", "3", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["batches"]
    assert [r["edits"] for r in rows] == [1, 3]
    # per step: 1 bank row shared by K edits on the 5 injected steps and 4 guided steps
    k1, k3 = rows[0]["row_passes_per_edit"], rows[1]["row_passes_per_edit"]
    assert k1 - k3 == pytest.approx((5 + 4) * (1 - 1 / 3), abs=0.1)
    assert "| 32 | move | 3 |" in result.output


@pytest.mark.parametrize("world", quality.WORLDS)
@pytest.mark.parametrize("mode", quality.CASE_SETS)
def test_doing_nothing_fails_every_case(mode, world):
    """No case of the 50-case set can be passed by returning the source (a pasted object the
    colour of what it covers once could)."""
    for case in quality.make_cases(mode, 50, world=world):
        assert success.verdict(case.mode, quality.score(case, case.source), 64), case.name


def test_textured_cases_are_held_out_and_need_generation():
    """The textured world's cases are not the flat world's; the place a moved object leaves shows
    the background's pattern (a flat fill of its rim's colour scores low there)."""
    flat, textured = quality.make_cases("move", 6), quality.make_cases("move", 6, world="textured")
    assert all(not np.array_equal(a.source, b.source) for a, b in zip(flat, textured))
    spreads = []
    for case in textured:
        vacated = case.old_mask & ~case.new_mask
        plug = case.truth.copy()
        plug[vacated] = np.median(case.truth[vacated], axis=0).astype(np.uint8)
        m = quality.score(case, plug)
        spreads.append(m["vacated_psnr"])
    assert np.median(spreads) < 30  # a plug is far from the texture continued
    assert quality.score(textured[0], textured[0].truth)["vacated_psnr"] == 99.0


def test_the_zero_predictor_control_fails_every_mode_but_the_latent_placements(tmp_path):
    """The control run (the denoiser's output replaced by zeros; features, bank and energies
    kept) does not make the edits: if it did, the benchmark would measure the latent operations,
    not the model. A zero predictor hands back whatever the initial latent holds, so the
    reference's own latent placements are the known exceptions (docs/benchmarks.md): paste (the
    placed reference's inverted latent), a growing resize (the object's inverted latent scaled
    over its old place) and a short partial drag (the handle's 3×3 latent patch copied onto the
    target). A shrinking resize must still fail: the old outline stays."""
    summary = quality.run(
        tmp_path,
        quality.CASE_SETS,
        cases=3,
        spec_overrides={"steps": 10},
        log=lambda m: None,
        baseline=False,
    )
    for mode, s in summary["modes"].items():
        assert s["completed"] == 3 and s["control_successes"] is not None, mode
        if mode in ("move", "drag", "appearance"):
            assert s["control_successes"] == 0, (mode, s["per_case"])
    cases = quality.make_cases("resize", 3)
    for case, record in zip(cases, summary["modes"]["resize"]["per_case"]):
        if case.spec["scale"] < 1:
            assert not record["control_success"], record
    # the control never shares an inversion with the model: its identity says what it is
    from dragonctl import api

    session = api.Session(api.EditOptions(no_cache=True))
    quality.zero_predictor(session.editor("shapes"))
    real = api.Session(api.EditOptions(no_cache=True)).editor("shapes")
    control = session.editor("shapes")
    assert control.bundle.identity["weights_hash"] != real.bundle.identity["weights_hash"]
    z = control.forward(torch.ones(1, 48, 16, 16), torch.tensor(1), torch.zeros(1, 4, 64))
    assert not z.any()


def test_stretching_keeps_what_lies_before_the_cut_and_moves_the_rest_on():
    square = np.zeros((12, 12), dtype=bool)
    square[2:6, 3:7] = True  # rows 2-5, columns 3-6
    right = quality.stretched(square, 5, 3, "right")
    assert right[2:6, 3:10].all() and right.sum() == 4 * 7
    left = quality.stretched(square, 5, 2, "left")  # columns 5-6 stay; 3-4 move two left
    assert left[2:6, 1:7].all() and left.sum() == 4 * 6
    down = quality.stretched(square, 4, 4, "down")
    assert down[2:10, 3:7].all() and down.sum() == 8 * 4
    up = quality.stretched(square, 4, 1, "up")
    assert up[1:6, 3:7].all() and up.sum() == 5 * 4


def test_partial_drags_edit_beyond_the_cut_and_a_rigid_move_misses_them():
    """drag_part: the editable region never covers the object's fixed part, the handle's content
    ends at the target, and the whole object moved by the drag vector fails the place
    criterion."""
    for case in quality.make_cases("drag_part", 20, size=128):
        (hx, hy), (tx, ty) = case.spec["points"][0]
        assert case.spec["mode"] == "drag"
        fixed = case.old_mask & ~case.edit_region
        assert fixed.sum() > 0.3 * case.old_mask.sum(), case.name  # part of it, not all
        assert case.new_mask[int(ty), int(tx)] and case.old_mask[int(hy), int(hx)]
        assert not case.edit_region[case.old_mask].all()
        shift = (round(tx - hx), round(ty - hy))
        rigid = np.roll(case.old_mask, (shift[1], shift[0]), axis=(0, 1))
        error = quality._centroid_error(rigid, case.new_mask)
        assert error > success.CENTROID_FRACTION * 128, case.name
