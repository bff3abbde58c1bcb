"""Never lose a file: outputs replace only nothing or what dragonctl wrote, chains run in order,
outputs are regular PNG files, and `validate` checks outputs with the same function as `edit`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import save_png, scene_image, write_spec
from typer.testing import CliRunner

from dragonctl.cli import app

runner = CliRunner()


def _move(folder: Path, name: str, model: Path, **over) -> Path:
    fields = dict(
        image="src.png",
        mode="move",
        mask={"box": [8, 10, 24, 26]},
        offset=[12, 2],
        model=str(model),
        steps=2,
        resolution=32,
    )
    return write_spec(folder, name, **{**fields, **over})


def test_an_output_never_replaces_a_file_dragonctl_did_not_write(tiny_sd, workdir):
    photo = save_png(workdir / "photo.png", scene_image())
    before = photo.read_bytes()
    a = _move(workdir, "a.yaml", tiny_sd, image="photo.png", output="a_out.png")
    b = _move(workdir, "b.yaml", tiny_sd, output="photo.png")  # would destroy a's input
    for args in (["edit", "--no-cache"], ["validate"]):
        r = runner.invoke(app, [*args, str(a), str(b)])
        assert r.exit_code == 2, r.output
        assert f"{b}: output: {photo} exists and was not written by dragonctl" in r.output
    assert photo.read_bytes() == before and not (workdir / "a_out.png").exists()
    # with --overwrite it runs as a chain: b first, then a edits b's result
    r = runner.invoke(app, ["edit", str(a), str(b), "--no-cache", "--overwrite", "--json"])
    assert r.exit_code == 0, r.output
    assert [line.split('"spec": ')[1].split(",")[0] for line in r.stdout.splitlines()] == [
        f'"{b}"',
        f'"{a}"',
    ]  # reported as they finish: b first
    assert photo.read_bytes() != before and (workdir / "a_out.png").exists()


def test_a_two_step_chain_runs_in_dependency_order(tiny_sd, workdir):
    first = _move(workdir, "first.yaml", tiny_sd, output="step1.png")
    second = _move(
        workdir, "second.yaml", tiny_sd, image="step1.png", offset=[-6, 0], output="step2.png"
    )
    r = runner.invoke(app, ["validate", str(second), str(first)])
    assert r.exit_code == 0, r.output
    assert f"an input is produced by {first}" in r.output
    r = runner.invoke(app, ["edit", str(second), str(first), "--no-cache"])  # given out of order
    assert r.exit_code == 0, r.output
    assert r.output.index("first.yaml ->") < r.output.index("second.yaml ->")
    assert (workdir / "step2.png").exists()
    # a rerun replaces both outputs: dragonctl wrote them
    assert runner.invoke(app, ["edit", str(first), str(second), "--no-cache"]).exit_code == 0


def test_a_chain_whose_first_step_fails_does_not_run_its_second(tiny_sd, workdir):
    first = _move(workdir, "first.yaml", tiny_sd, output="step1.png")
    second = _move(workdir, "second.yaml", tiny_sd, image="step1.png", output="step2.png")
    (workdir / "src.png").write_bytes(b"not an image any more")  # the first step cannot run
    r = runner.invoke(app, ["edit", str(first), str(second), "--no-cache"])
    assert r.exit_code == 1
    assert f"{second}: not run: it reads the output of {first}, which failed" in r.output


def test_specs_that_read_each_others_outputs_are_a_cycle(tiny_sd, workdir):
    a = _move(workdir, "a.yaml", tiny_sd, image="b.png", output="a.png")
    b = _move(workdir, "b.yaml", tiny_sd, image="a.png", output="b.png")
    for command in ("edit", "validate"):
        r = runner.invoke(app, [command, str(a), str(b)])
        assert r.exit_code == 2 and "in a cycle" in r.output, r.output


@pytest.mark.parametrize("name", ["x.json", "x.jpg", "x"])
def test_outputs_are_png_files(tiny_sd, workdir, name):
    spec = _move(workdir, "m.yaml", tiny_sd, output=name)
    r = runner.invoke(app, ["validate", str(spec)])
    assert r.exit_code == 2 and "outputs are PNG files" in r.output
    r = runner.invoke(app, ["edit", str(spec), "--no-cache"])
    assert r.exit_code == 1 and "outputs are PNG files" in r.output
    assert not (workdir / name).exists()


def test_only_regular_files_are_replaced(tiny_sd, workdir):
    fifo = workdir / "pipe.png"
    os.mkfifo(fifo)
    (workdir / "dir.png").mkdir()
    (workdir / "file").write_text("x")
    for out, reason in [
        ("pipe.png", "not a regular file"),
        ("/dev/null", "outputs are PNG"),
        ("dir.png", "not a regular file"),
        ("file/x.png", "is a file, not a folder"),
    ]:
        spec = _move(workdir, "m.yaml", tiny_sd, output=out)
        for args, code in ((["validate"], 2), (["edit", "--no-cache"], 1)):
            r = runner.invoke(app, [*args, str(spec)])
            assert r.exit_code == code and reason in r.output, (out, args, r.output)
    assert fifo.is_fifo() and (workdir / "dir.png").is_dir()


def test_an_unwritable_folder_is_found_before_the_edit(tiny_sd, workdir, monkeypatch):
    (workdir / "locked").mkdir()
    spec = _move(workdir, "m.yaml", tiny_sd, output="locked/out.png")
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: Path(p).name != "locked" and real_access(p, mode)
    )  # root ignores permissions: simulate the folder's
    for command, code in (("validate", 2), ("edit", 1)):
        r = runner.invoke(app, [command, str(spec)])
        assert r.exit_code == code and "cannot write in" in r.output and "locked" in r.output


def test_an_output_without_metadata_is_still_known_as_dragonctls(tiny_sd, workdir):
    spec = _move(workdir, "m.yaml", tiny_sd, output="out.png")
    for _ in range(2):
        r = runner.invoke(app, ["edit", str(spec), "--no-cache", "--no-metadata"])
        assert r.exit_code == 0, r.output


def test_init_never_writes_over_its_image(workdir):
    image = workdir / "src.png"
    before = image.read_bytes()
    for out in ("src.png", "starter.txt"):
        r = runner.invoke(app, ["init", "move", str(image), "-o", str(workdir / out), "--force"])
        assert r.exit_code == 2 and "error:" in r.output
    assert image.read_bytes() == before


def test_an_output_that_is_an_input_is_found_by_validate(tiny_sd, workdir):
    spec = _move(workdir, "m.yaml", tiny_sd, output="src.png")
    for args, code in ((["validate"], 2), (["edit", "--no-cache"], 1)):
        r = runner.invoke(app, [*args, str(spec)])
        assert r.exit_code == code and "is one of the spec's inputs" in r.output, r.output


def test_a_chain_stays_whole_across_devices(tiny_sd, workdir):
    from dragonctl import api
    from dragonctl.batch import assign_to_devices, check_jobs

    first = _move(workdir, "first.yaml", tiny_sd, output="step1.png")
    second = _move(workdir, "second.yaml", tiny_sd, image="step1.png", output="step2.png")
    other = _move(
        workdir,
        "other.yaml",
        tiny_sd,
        image="ref.png",
        output="other.png",
        mask={"box": [16, 16, 32, 32]},
    )
    jobs = check_jobs([second, other, first], None, None)
    assigned = assign_to_devices(jobs, ["cpu", "cpu:1"])
    assert sorted(map(sorted, assigned.values())) == [[0, 2], [1]]  # the chain on one device
    reports = api.edit([second, other, first], api.EditOptions(device="cpu,cpu", no_cache=True))
    assert all(r.ok for r in reports), [r.errors for r in reports]
    assert (workdir / "step2.png").exists()
