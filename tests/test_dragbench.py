"""DragBench import (both layouts, safe pickle), validation of all samples, a few edits end to
end."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED, save_png
from PIL import Image
from typer.testing import CliRunner

from dragonctl import api
from dragonctl.cli import app
from dragonctl.dragbench_import import import_dragbench, safe_load_pickle
from dragonctl.geometry import Frame, working_size

FIXTURE = Path(__file__).parent / "fixtures" / "dragbench"  # two real samples, in every clone
DRAGBENCH = SHARED / "data" / "dragbench"  # 103 samples, beside the developers' checkouts only


def _import(src: Path, out: Path) -> list[Path]:
    written, failed = import_dragbench(src, out)
    assert not failed
    return written


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> list[Path]:
    return _import(FIXTURE, tmp_path_factory.mktemp("dragbench"))


def test_the_fixture_samples_import_as_their_instructions_say(imported):
    assert sorted(p.relative_to(p.parents[1]).as_posix() for p in imported) == [
        "other_objects/JH_2023-09-15-1012-49.yaml",
        "other_objects/JH_2023-09-15-1017-43.yaml",
    ]
    for spec in imported:
        instr = json.loads(
            (FIXTURE / "other_objects" / spec.stem / "drag_instruction.json").read_text()
        )
        ls = api.load_spec(spec)
        pts = instr["points"]
        assert ls.spec.prompt == instr["prompt"] and ls.spec.mode == "drag"
        assert ls.spec.points == [[pts[i], pts[i + 1]] for i in range(0, len(pts), 2)]
        sample = FIXTURE / "other_objects" / spec.stem
        assert ls.resolve(ls.spec.mask.path).resolve() == (sample / "mask.png").resolve()
        assert ls.resolve(ls.spec.image).resolve() == (sample / "original_image.png").resolve()
    assert all(r.ok and not r.warnings for r in api.validate(imported))


@pytest.mark.skipif(not DRAGBENCH.is_dir(), reason="the full DragBench part is in ../shared only")
def test_all_shared_samples_import_and_validate(tmp_path):
    imported = _import(DRAGBENCH, tmp_path)
    assert len(imported) == 103
    reports = api.validate(imported)
    assert all(r.ok for r in reports), [r.errors for r in reports if not r.ok]
    zero = [r for r in reports if any("zero length" in w for w in r.warnings)]
    assert (
        len(zero) == 1
    )  # one sample holds a zero-length pair: it imports and validates with a warning
    # category/sample names are kept
    assert {p.parent.name for p in imported} >= {"animals", "art_work", "human_head", "land_scape"}


def test_import_into_an_existing_folder_rewrites_the_same_specs(imported):
    out = imported[0].parents[1]
    before = {p: p.read_text() for p in imported}
    written, failed = import_dragbench(FIXTURE, out)
    assert not failed and sorted(written) == sorted(imported)
    assert all(p.read_text() == before[p] for p in imported)


def test_points_round_trip_within_half_a_pixel_at_every_sample_size(imported):
    for spec in imported:
        ls = api.load_spec(spec)
        w, h = Image.open(ls.resolve(ls.spec.image)).size
        frame = Frame(h, w, *working_size(h, w, 512, 64))
        for pair in ls.spec.points:
            for x, y in pair:
                bx, by = frame.to_source(*frame.to_work(x, y))
                assert abs(bx - x) <= 0.5 and abs(by - y) <= 0.5


def test_the_samples_edit_end_to_end_at_their_exact_size(imported, tiny_sd, tmp_path):
    import yaml

    picks = []
    for src in imported:  # at a tiny working size: plumbing, not quality
        data = yaml.safe_load(src.read_text())
        data.update(
            image=str((src.parent / data["image"]).resolve()),
            mask=str((src.parent / data["mask"]).resolve()),
            resolution=64,
            steps=4,
        )
        picks.append(tmp_path / "specs" / src.name)
        picks[-1].parent.mkdir(exist_ok=True)
        picks[-1].write_text(yaml.safe_dump(data))
    reports = api.edit(
        picks, api.EditOptions(out_dir=tmp_path / "out", model=str(tiny_sd), no_cache=True)
    )
    for rep in reports:
        assert rep.ok, rep.errors
        ls = api.load_spec(rep.path)
        assert Image.open(rep.output).size == Image.open(ls.resolve(ls.spec.image)).size


def _original_layout(root: Path, payload) -> Path:
    folder = root / "cat" / "sample1"
    folder.mkdir(parents=True)
    save_png(folder / "original_image.png", np.full((40, 64, 3), 120, dtype=np.uint8))
    (folder / "meta_data.pkl").write_bytes(pickle.dumps(payload))
    return folder


def test_original_layout_with_a_numpy_mask(tmp_path, tiny_sd):
    mask = np.zeros((40, 64), dtype=np.uint8)
    mask[5:30, 10:50] = 1
    _original_layout(
        tmp_path / "src",
        {"prompt": "a grey wall", "points": [[20, 10], [30, 12], [15, 15], [15, 15]], "mask": mask},
    )
    written, failed = import_dragbench(tmp_path / "src", tmp_path / "out")
    assert not failed and len(written) == 1
    ls = api.load_spec(written[0])
    assert ls.spec.prompt == "a grey wall" and ls.spec.points == [
        [[20, 10], [30, 12]],
        [[15, 15], [15, 15]],
    ]
    assert api.validate(written)[0].ok
    assert np.array_equal(np.asarray(Image.open(ls.resolve(ls.spec.mask.path))) > 0, mask > 0)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/dragonctl-pwned",))


def test_a_malicious_pickle_is_refused_without_running(tmp_path):
    marker = Path("/tmp/dragonctl-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(pickle.UnpicklingError, match="refused to load"):
        safe_load_pickle(pickle.dumps({"prompt": "x", "points": [], "mask": _Evil()}))
    _original_layout(tmp_path / "src", {"prompt": "x", "points": [[1, 1], [2, 2]], "mask": _Evil()})
    written, failed = import_dragbench(tmp_path / "src", tmp_path / "out")
    assert not written and len(failed) == 1 and "refused to load" in failed[0]
    assert not marker.exists()


def test_import_cli(tmp_path):
    runner = CliRunner()
    assert (
        runner.invoke(
            app, ["import", "dragbench", str(tmp_path / "none"), str(tmp_path / "o")]
        ).exit_code
        == 2
    )
    (tmp_path / "empty").mkdir()
    assert (
        runner.invoke(
            app, ["import", "dragbench", str(tmp_path / "empty"), str(tmp_path / "o")]
        ).exit_code
        == 2
    )


def test_bench_dragbench_reports_times_and_protocol_scores(imported, tiny_sd, tmp_path):
    from safetensors.torch import save_file

    from dragonctl.bench.dragbench_metrics import LPIPS
    from dragonctl.bench.dragbench_run import run

    lp = tmp_path / "lpips.safetensors"
    state = LPIPS().state_dict()  # random weights; LPIPS heads are non-negative, like the real ones
    save_file(
        {k: (v.abs() if k.startswith("heads") else v).contiguous() for k, v in state.items()}, lp
    )
    specs_dir = imported[0].parents[1]
    rows, failed = run(
        specs_dir,
        tmp_path / "bench",
        str(tiny_sd),
        steps=3,
        resolution=64,
        limit=2,
        log=lambda m: None,
        dift_model=str(tiny_sd),
        lpips_weights=lp,
        dift_resolution=64,
    )
    assert not failed and len(rows) == 2
    for row in rows:
        assert Path(row["output"]).exists() and {"seconds", "peak_memory_mb"} <= set(row)
        assert row["mean_distance"] >= 0 and 0 <= row["image_fidelity"] <= 1.0 + 1e-6
    inputs = json.loads((tmp_path / "bench" / "md_if_inputs.json").read_text())
    assert len(inputs) == 2 and inputs[0]["handles"] and Path(inputs[0]["source"]).exists()
