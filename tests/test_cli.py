"""The command line: exit codes, messages, outputs, in-process (CliRunner) plus a few real
processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_spec
from typer.testing import CliRunner

from dragonctl.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_validate_exit_codes(spec_for, workdir):
    good = spec_for("move")
    bad = write_spec(
        workdir, "bad.yaml", image="src.png", mode="move", mask="mask.png", offset=[500, 0]
    )
    r = run("validate", str(good))
    assert r.exit_code == 0 and f"ok  {good}" in r.output
    r = run("validate", str(good), str(bad))
    assert r.exit_code == 2
    assert f"{bad}: offset: moves the object fully outside the frame" in r.output
    assert "Traceback" not in r.output
    assert run("validate").exit_code == 2
    assert run("validate", "--bogus").exit_code == 2
    assert run("validate", str(workdir / "nothing-*.yaml")).exit_code == 2


def test_bench_speed_refuses_unknown_settings_before_building_anything():
    r = run("bench", "speed", "--size", "tiny", "--compile", "fast")
    assert (
        r.exit_code == 2 and "--compile is on or one of off, default, reduce-overhead" in r.output
    )
    assert run("bench", "speed", "--size", "tiny", "--kv-bank", "disk").exit_code == 2
    assert "--compile" in run("edit", "--help").output


def test_bench_errors_are_one_line_not_a_traceback(tmp_path):
    r = run(
        "bench", "speed", "--size", "tiny", "--dtype", "float16", "--out", str(tmp_path / "s.json")
    )
    assert r.exit_code == 1 and "error: --dtype: unknown dtype 'float16'" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "s.json").exists()
    r = run(
        "bench",
        "quality",
        str(tmp_path / "q"),
        "--model",
        str(tmp_path / "no-such-model"),
        "--mode",
        "move",
    )
    assert r.exit_code == 1 and r.output.count("\n") <= 3 and "no-such-model" in r.output, r.output


def test_validate_json_records(spec_for):
    r = run("validate", "--json", str(spec_for("drag")))
    rec = json.loads(r.stdout.splitlines()[0])
    assert rec["ok"] and rec["warnings"] == ["points[1] has zero length; it will not move anything"]


def test_edit_batch_continues_past_failures_and_exits_1(tiny_sd, spec_for, workdir):
    good = spec_for("move", model=str(tiny_sd))
    bad = write_spec(
        workdir, "bad.yaml", image="missing.png", mode="move", mask="mask.png", offset=[4, 0]
    )
    r = run("edit", str(good), str(bad), "--no-cache")
    assert r.exit_code == 1
    assert (workdir / "move.edited.png").exists() and not (workdir / "bad.edited.png").exists()
    assert f"failed: {bad}: image: file not found" in r.output and "1 done, 1 failed" in r.output


def test_edit_out_dir_mirrors_the_spec_layout(tiny_sd, workdir):
    for sub in ("a/b", "c"):
        (workdir / sub).mkdir(parents=True)
        write_spec(
            workdir / sub,
            "s.yaml",
            image="../" * len(sub.split("/")) + "src.png",
            mode="move",
            mask="../" * len(sub.split("/")) + "mask.png",
            offset=[4, 0],
            model=str(tiny_sd),
            steps=3,
            resolution=32,
        )
    out = workdir / "out"
    r = run(
        "edit",
        str(workdir / "a"),
        str(workdir / "c" / "s.yaml"),
        "--out",
        str(out),
        "--no-cache",
        "--json",
    )
    assert r.exit_code == 0, r.output
    assert (out / "a" / "b" / "s.png").exists() and (out / "c" / "s.png").exists()
    assert (out / "c" / "s.json").exists()
    recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(recs) == 2 and all(x["ok"] for x in recs)


def test_two_specs_with_one_output_is_refused_before_running(tiny_sd, spec_for, workdir):
    a = spec_for("move", name="a.yaml", model=str(tiny_sd), output="same.png")
    b = spec_for("move", name="b.yaml", model=str(tiny_sd), output="same.png")
    r = run("edit", str(a), str(b), "--no-cache")
    assert r.exit_code == 2 and "also the output of" in r.output
    assert not (workdir / "same.png").exists()


def test_output_never_overwrites_an_input(tiny_sd, spec_for, workdir):
    before = (workdir / "src.png").read_bytes()
    spec = spec_for("move", model=str(tiny_sd), output="src.png")
    r = run("edit", str(spec), "--no-cache")
    assert r.exit_code == 1 and "one of the spec's inputs" in r.output
    assert (workdir / "src.png").read_bytes() == before


def test_no_metadata_and_skip_existing(tiny_sd, spec_for, workdir):
    spec = spec_for("move", model=str(tiny_sd))
    assert run("edit", str(spec), "--no-cache").exit_code == 0
    sidecar = json.loads((workdir / "move.edited.json").read_text())
    assert sidecar["spec"]["mode"] == "move" and sidecar["model"]["weights_hash"]
    assert set(sidecar["versions"]) >= {"torch", "diffusers", "dragonctl"}
    r = run("edit", str(spec), "--no-cache", "--skip-existing", "--json")
    assert json.loads(r.stdout.splitlines()[0])["skipped"] is True
    (workdir / "move.edited.json").unlink()
    assert run("edit", str(spec), "--no-cache", "--no-metadata").exit_code == 0
    from PIL import Image

    assert "dragonctl" not in Image.open(workdir / "move.edited.png").text
    assert not (workdir / "move.edited.json").exists()


def test_preview_and_init(spec_for, workdir):
    spec = spec_for("paste")
    r = run("preview", str(spec), "-o", str(workdir / "p.png"))
    assert r.exit_code == 0 and (workdir / "p.png").exists()
    from PIL import Image

    assert Image.open(workdir / "p.png").size[0] > 56  # the reference panel sits beside the source
    r = run("init", "drag", str(workdir / "src.png"), "-o", str(workdir / "starter.yaml"))
    assert r.exit_code == 0
    assert run("validate", str(workdir / "starter.yaml")).exit_code == 0
    assert (
        run("init", "drag", str(workdir / "src.png"), "-o", str(workdir / "starter.yaml")).exit_code
        == 2
    )
    assert run("init", "spin", str(workdir / "src.png")).exit_code == 2
    assert run("init", "move", str(workdir / "nope.png")).exit_code == 2


@pytest.mark.parametrize("mode", ["move", "resize", "drag", "appearance", "paste"])
def test_init_starters_validate_as_written_for_every_mode(workdir, mode):
    from dragonctl.spec import mode_defaults

    starter = workdir / f"{mode}_starter.yaml"
    r = run("init", mode, str(workdir / "src.png"), "-o", str(starter))
    assert r.exit_code == 0
    v = run("validate", str(starter))
    assert v.exit_code == 0, v.output
    # the commented guidance is the shapes model's own for this mode, not SD's
    g = mode_defaults("shapes", mode)["guidance"]
    assert f"energy_scale: {g['energy_scale']}, cfg_scale: {g['cfg_scale']}" in starter.read_text()


def test_init_takes_a_reference_image_for_appearance_and_paste(workdir):
    starter = workdir / "paste_starter.yaml"
    r = run(
        "init",
        "paste",
        str(workdir / "src.png"),
        "--reference",
        str(workdir / "ref.png"),
        "-o",
        str(starter),
    )
    assert r.exit_code == 0 and "image: ref.png" in starter.read_text()
    assert run("validate", str(starter)).exit_code == 0
    r = run("init", "paste", str(workdir / "src.png"), "--reference", str(workdir / "no.png"))
    assert r.exit_code == 2 and "no.png" in r.output


def test_an_unknown_field_suggests_the_one_meant(spec_for, workdir):
    spec = spec_for(
        "move",
        ofset=[3, 0],
        guidance={"energy_scal": 1.0},
        mask={"box": [8, 10, 24, 26], "dilat": 1},
    )
    r = run("validate", str(spec))
    assert r.exit_code == 2
    assert f"{spec}: ofset: unknown field (did you mean `offset`?)" in r.output
    assert f"{spec}: guidance.energy_scal: unknown field (did you mean `energy_scale`?)" in r.output
    assert f"{spec}: mask.dilat: unknown field (did you mean `dilate`?)" in r.output
    spec = spec_for("move", name="far.yaml", zzz=1)
    assert f"{spec}: zzz: unknown field\n" in run("validate", str(spec)).output


def test_a_value_nested_too_deeply_names_its_field(spec_for, workdir):
    spec = spec_for("move")
    spec.write_text(spec.read_text() + "prompt: " + "[" * 1500 + "]" * 1500 + "\n")
    r = run("validate", str(spec))
    assert r.exit_code == 2 and f"{spec}: prompt: nested more than 32 levels deep" in r.output


def test_editing_a_spec_that_does_not_exist_is_bad_usage(workdir):
    r = run("edit", str(workdir / "nospec.yaml"))
    assert r.exit_code == 2 and "nospec.yaml: no such spec file or folder" in r.output


def test_a_reader_of_a_refused_output_is_checked_against_the_file_now(spec_for, workdir):
    from PIL import Image

    Image.new("RGB", (20, 20)).save(workdir / "b_out.png")  # not dragonctl's: b may not replace it
    b = spec_for("move", name="b.yaml", output="b_out.png")
    a = spec_for("move", name="a.yaml", image="b_out.png", mask={"box": [8, 8, 30, 30]})
    r = run("validate", str(a), str(b))
    assert r.exit_code == 2
    assert f"{a}: mask.box: box [8.0, 8.0, 30.0, 30.0] is outside the 20×20 frame" in r.output
    assert f"{a}: reads b_out.png, the output of {b}, which is invalid" in r.output
    assert f"ok  {a}" not in r.output
    r = run("validate", str(a), str(b), "--overwrite")  # b may replace it: a is checked after b
    assert r.exit_code == 0 and "checked when it has run" in r.output


def test_invert_then_cache_info_and_clear(tiny_sd, spec_for, workdir):
    cache = workdir / "cache"
    spec = spec_for("paste", model=str(tiny_sd))
    r = run("invert", str(spec), "--cache-dir", str(cache))
    assert r.exit_code == 0 and "2 inverted" in r.output
    assert "cached already" in run("invert", str(spec), "--cache-dir", str(cache)).output
    info = run("cache", "info", "--cache-dir", str(cache)).output
    assert "entries: 2" in info
    assert "removed 2" in run("cache", "clear", "--cache-dir", str(cache)).output


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dragonctl", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def test_real_process_exit_codes_and_no_traceback(spec_for, workdir):
    ok = _cli("validate", str(spec_for("move")))
    assert ok.returncode == 0
    bad = write_spec(workdir, "bad.yaml", image="src.png", mode="jump")
    r = _cli("validate", str(bad))
    assert r.returncode == 2 and "mode:" in r.stderr and "Traceback" not in r.stderr
    assert _cli("edit").returncode == 2
    assert _cli("--bogus-flag").returncode == 2


def test_help_does_not_import_torch():
    code = (
        "import sys; from dragonctl import api, cli\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    r = _cli("edit", "--help")
    assert r.returncode == 0 and "--out" in r.stdout


def test_save_preview_writes_overlay_and_side_by_side(tiny_sd, spec_for, workdir):
    spec = spec_for("move", model=str(tiny_sd), output="res/m.png")
    assert run("edit", str(spec), "--no-cache", "--save-preview").exit_code == 0
    from PIL import Image

    k = -(-256 // 40)  # the preview sheet: enlarged to a 256-px short side, a legend below
    w, h = Image.open(workdir / "res" / "m.overlay.png").size
    assert w == 56 * k and h > 40 * k
    assert Image.open(workdir / "res" / "m.compare.png").size == (56 * 2 + 4, 40)
