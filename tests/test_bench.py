"""The benchmarks run (tiny sizes here; the real tables come from full runs) and their metrics are
right."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dragonctl.bench import quality, speed


@pytest.mark.parametrize("mode", quality.MODES)
def test_quality_metrics_are_perfect_on_the_ground_truth(mode):
    # 12 cases: the benchmark's own count, with backgrounds that pass through the object's colour
    for case in quality.make_cases(mode, 12):
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


def test_quality_metrics_see_an_edit_that_did_nothing():
    for case in quality.make_cases("move", 3):
        m = quality.score(case, case.source)
        assert m["residue"] == 1.0 and m["iou"] < 0.5 and m["centroid_error"] > 4


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
        tmp_path, ("move", "appearance"), cases=1, spec_overrides={"steps": 6}, log=lambda m: None
    )
    assert (tmp_path / "quality.json").exists() and (tmp_path / "sheet_move.png").exists()
    for mode in ("move", "appearance"):
        s = summary["modes"][mode]
        assert (
            s["completed"] == 1
            and "background_psnr" in s["median"]
            and "background_psnr" in s["baseline_median"]
        )
    assert "| move | 1/1 |" in quality.table(summary)


def test_speed_benchmark_runs_at_tiny_size_and_counts_passes(tmp_path):
    results = speed.run("tiny", (32,), ("move", "paste"), steps=6, device="cpu", log=lambda m: None)
    speed.save(results, tmp_path / "speed.json")
    runs = json.loads((tmp_path / "speed.json").read_text())["runs"]
    move = next(r for r in runs if r["mode"] == "move")
    # 6 inversion calls, 6 edit steps, 4 guided steps (i < 0.6·6), each two truncated forwards
    # (the bank's without grad, the edited latent's with) and one backward
    assert (move["inversion_unet_calls"], move["unet_forward"], move["unet_backward"]) == (6, 20, 4)
    paste = next(r for r in runs if r["mode"] == "paste")
    assert paste["inversion_unet_calls"] == 12  # the source and the placed reference
    assert (move["bank_images"], paste["bank_images"]) == (1, 2)
    timed = {"total_s", "inversion_s", "editing_s", "re_edit_cached_s", "plain_eager_s", "warmup_s"}
    assert all(r["cuda_syncs_per_edit"] is None and timed <= set(r) for r in runs)
    assert "| 32 | move | dragondiffusion | recompute |" in speed.table(results)


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
