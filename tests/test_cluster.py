"""`edit --ray` on a local Ray runtime (CPU, the shapes model): the same pixels as a plain run,
a killed worker loses nothing, failures are reported once, interrupted batches resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray
from conftest import save_png, scene_image, write_spec
from PIL import Image
from typer.testing import CliRunner

from dragonctl import api
from dragonctl.cli import app


@pytest.fixture(scope="module")
def ray_runtime():
    """One local runtime for the module: the batches join it (and leave it running)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def batch(tmp_path):
    """Three sources with two specs each: three units for two workers."""
    specs = []
    for i, color in enumerate([(220, 40, 40), (40, 200, 60), (40, 60, 220)]):
        save_png(tmp_path / f"src{i}.png", scene_image(color=color))
        for j, offset in enumerate(([16, 4], [10, -4])):
            specs.append(
                write_spec(
                    tmp_path,
                    f"s{i}{j}.yaml",
                    image=f"src{i}.png",
                    mode="move",
                    mask={"box": [8, 10, 24, 26]},
                    offset=offset,
                    model="shapes",
                    steps=4,
                    inversion_refine=0,  # what is tested is where edits run, not how well
                )
            )
    return specs


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def test_a_ray_batch_gives_the_pixels_of_a_plain_run(ray_runtime, batch, tmp_path):
    local = api.edit(batch, api.EditOptions(no_cache=True, out_dir=tmp_path / "local"))
    remote = api.edit(batch, api.EditOptions(no_cache=True, out_dir=tmp_path / "ray", ray=True))
    assert all(r.ok for r in local + remote)
    for a, b in zip(local, remote):
        assert np.abs(pixels(a.output) - pixels(b.output)).max() <= 1
    assert len({r.worker for r in remote}) == 2  # two workers shared the three units
    by_source = {}
    for r in remote:
        by_source.setdefault(r.path.name[:2], set()).add(r.worker)
    assert all(len(w) == 1 for w in by_source.values())  # a source stays on one worker
    # each source is inverted once, on the worker that edits it
    assert sum(r.inversions for r in remote) == len(by_source)
    sidecar = json.loads(remote[0].output.with_suffix(".json").read_text())
    assert (
        sidecar["inputs"] == json.loads(local[0].output.with_suffix(".json").read_text())["inputs"]
    )


def test_a_worker_killed_mid_batch_loses_nothing(ray_runtime, batch, tmp_path):
    killed: list[str] = []

    def kill_the_other_worker(rep: api.SpecReport) -> None:
        if killed:
            return
        for name in ray.util.list_named_actors():
            actor = ray.get_actor(name)
            if name.startswith("dragonctl-") and ray.get(actor.where.remote()) != rep.worker:
                ray.kill(actor)  # it is running its unit's spec now
                killed.append(name)
                return

    opts = api.EditOptions(no_cache=True, out_dir=tmp_path / "out", ray=True)
    reports = api.edit(batch, opts, on_report=kill_the_other_worker)
    assert killed and all(r.ok for r in reports), [r.errors for r in reports]
    assert len({r.worker for r in reports}) == 3  # a replacement took over the lost unit
    assert all(r.output.is_file() for r in reports)


def test_failures_are_reported_once_and_the_rest_finish(ray_runtime, batch, tmp_path):
    write_spec(tmp_path, "bad.yaml", image="src0.png", mode="move", model="shapes")  # no mask
    save_png(tmp_path / "src9.png", scene_image())
    write_spec(  # valid, but its model cannot load: it fails on the worker
        tmp_path,
        "nomodel.yaml",
        image="src9.png",
        mode="move",
        mask={"box": [8, 10, 24, 26]},
        offset=[4, 0],
        model=str(tmp_path / "no-such-model"),
    )
    specs = [*batch[:2], tmp_path / "bad.yaml", tmp_path / "nomodel.yaml"]
    args = ["edit", *map(str, specs), "--ray", "--no-cache", "--json", "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    records = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    by_name = {rec["spec"].rsplit("/", 1)[-1]: rec for rec in records}
    assert len(records) == 4
    assert by_name["s00.yaml"]["ok"] and by_name["s01.yaml"]["ok"]
    assert by_name["s00.yaml"]["worker"]
    assert not by_name["bad.yaml"]["ok"] and "mask" in by_name["bad.yaml"]["errors"][0]
    assert not by_name["nomodel.yaml"]["ok"] and len(by_name["nomodel.yaml"]["errors"]) == 1


def test_an_interrupted_ray_batch_resumes_with_skip_existing(ray_runtime, batch, tmp_path):
    done: list[api.SpecReport] = []
    opts = api.EditOptions(no_cache=True, out_dir=tmp_path / "out", ray=True, workers=1)
    first = api.edit(batch, opts, on_report=done.append, stop=lambda: bool(done))
    finished = [r for r in first if r.ok]
    assert 1 <= len(finished) < len(batch)
    assert all(r.interrupted for r in first if not r.ok)
    outputs = sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".png")
    assert outputs == sorted(r.output.name for r in finished)  # nothing half-written

    again = api.edit(batch, api.EditOptions(**{**opts.__dict__, "skip_existing": True}))
    assert all(r.ok for r in again)
    assert {r.path for r in again if r.skipped} == {r.path for r in finished}


def test_units_keep_a_source_and_a_chain_on_one_worker(batch, tmp_path):
    from dragonctl.batch import check_jobs
    from dragonctl.cluster import work_units

    # a second step that edits s00's output: it joins s00's unit, after it
    step2 = write_spec(
        tmp_path,
        "step2.yaml",
        image="s00.edited.png",
        mode="move",
        mask={"box": [20, 10, 36, 26]},
        offset=[4, 0],
        model="shapes",
    )
    jobs = check_jobs([*batch, step2], None, None)
    units = work_units(jobs)
    names = [[jobs[k].path.name for k in u] for u in units]
    assert sorted(names[0]) == ["s00.yaml", "s01.yaml", "step2.yaml"]
    assert names[0].index("s00.yaml") < names[0].index("step2.yaml")
    assert sorted(map(sorted, names[1:])) == [["s10.yaml", "s11.yaml"], ["s20.yaml", "s21.yaml"]]
