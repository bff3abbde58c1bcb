"""Faults and abuse: batches that survive bad specs, atomic outputs under injected errors and
SIGKILL, Ctrl-C, cache damage, eviction, multi-device workers, reproducibility across processes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import save_png, scene_image, write_spec
from PIL import Image
from typer.testing import CliRunner

from dragonctl import api, files
from dragonctl.cache import TrajectoryCache
from dragonctl.cli import app
from dragonctl.outputs import png_bytes

runner = CliRunner()


def tiny_move(folder: Path, name: str, model: Path, image: str = "src.png", **over) -> Path:
    fields = dict(
        image=image,
        mode="move",
        mask={"box": [8, 10, 24, 26]},
        offset=[12, 2],
        model=str(model),
        steps=3,
        resolution=32,
    )
    return write_spec(folder, name, **{**fields, **over})


def test_batch_of_50_over_5_sources_with_5_broken(tiny_sd, tmp_path):
    for s in range(5):
        save_png(tmp_path / f"src{s}.png", scene_image(40, 56, (8 + s, 10, 24 + s, 26)))
    specs = []
    for k in range(50):
        s = k % 5
        if k % 10 == 9:  # five broken ones, each broken differently
            bad = [
                dict(offset=[900, 0]),
                dict(image="nope.png"),
                dict(mode="spin"),
                dict(steps="x"),
                dict(mask={"box": [0, 0, 99, 99]}),
            ][k // 10]
            specs.append(
                tiny_move(tmp_path, f"s{k:02d}.yaml", tiny_sd, **{"image": f"src{s}.png", **bad})
            )
        else:
            specs.append(
                tiny_move(
                    tmp_path, f"s{k:02d}.yaml", tiny_sd, f"src{s}.png", offset=[10 + k % 7, 1]
                )
            )
    r = runner.invoke(
        app, ["edit", str(tmp_path), "--out", str(tmp_path / "out"), "--json", "--no-cache"]
    )
    assert r.exit_code == 1
    recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(recs) == 50 and sum(x["ok"] for x in recs) == 45
    assert len(list((tmp_path / "out").glob("*.png"))) == 45
    assert sum(x["inversions"] for x in recs) == 5  # each source inverted once, not 45 times
    failed = [line for line in r.stderr.splitlines() if line.startswith("failed: ")]
    assert sorted({line.split(":")[1].strip() for line in failed}) == sorted(
        str(specs[k]) for k in range(9, 50, 10)
    )


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_injected_write_errors_leave_no_partial_file_and_keep_the_old_one(
    tiny_sd, workdir, monkeypatch, err
):
    spec = tiny_move(workdir, "m.yaml", tiny_sd, output="out/m.png")
    (workdir / "out").mkdir()
    old = png_bytes(np.zeros((8, 8, 3), np.uint8))  # an earlier result: dragonctl's to replace
    (workdir / "out" / "m.png").write_bytes(old)
    real_open = open

    class Failing:
        def __init__(self, path, mode):
            self.fh = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.fh.close()

        def write(self, data):
            self.fh.write(
                data[: len(data) // 2]
            )  # half of it reaches the disk, then the disk is "full"
            raise OSError(err, os.strerror(err))

    monkeypatch.setattr(
        files, "open", lambda p, m: Failing(p, m) if "w" in m else real_open(p, m), raising=False
    )
    r = runner.invoke(app, ["edit", str(spec), "--no-cache"])
    assert r.exit_code == 1
    line = [x for x in r.stderr.splitlines() if x.startswith("failed:")][0]
    assert f"{spec}: output: cannot write" in line and os.strerror(err) in line
    assert (workdir / "out" / "m.png").read_bytes() == old
    assert [p.name for p in (workdir / "out").iterdir()] == ["m.png"]  # no temporary left behind


# Faults are injected at fixed points inside a real `dragonctl` process (a prelude patches one
# function to signal its own process), so each test is deterministic whatever the machine's speed.
KILL_AT = """
import os, signal, sys
import dragonctl.files as files
_write, _calls = files.atomic_write, [0]
def atomic_write(path, data):
    _calls[0] += 1
    if _calls[0] == {call}:  # die with a temporary half written, before any rename
        tmp = path.with_name(f".{{path.name}}.{{os.getpid()}}.tmp")
        tmp.write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return _write(path, data)
files.atomic_write = atomic_write
"""

INTERRUPT_AFTER_FIRST_RESULT = """
import os, signal
import dragonctl.outputs as outputs
_write = outputs.write_result
def write_result(*args, **kwargs):
    out = _write(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the next edit starts
    return out
outputs.write_result = write_result
"""


def _cli(*args: str, prelude: str = "", cwd: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    main = (
        "import sys\nfrom dragonctl.cli import main\n"
        "sys.argv = ['dragonctl', *sys.argv[1:]]\nmain()\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", prelude + "\n" + main, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )


def test_atomic_write_killed_before_its_rename_keeps_the_old_file(tmp_path):
    target = tmp_path / "big.bin"
    target.write_bytes(b"A" * 1000)
    code = KILL_AT.format(call=1) + (
        "from pathlib import Path\nfiles.atomic_write(Path(sys.argv[1]), b'B' * 1000)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(target)])
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"A" * 1000  # the old file, whole
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1
    assert files.remove_stale_temporaries(tmp_path) == 1 and not leftovers[0].exists()
    files.atomic_write(target, b"C" * 10)
    assert target.read_bytes() == b"C" * 10


def test_killed_batch_leaves_no_partial_output_and_the_next_run_resumes(tiny_sd, workdir):
    specs = [
        tiny_move(workdir, f"k{i}.yaml", tiny_sd, steps=4, offset=[8 + i, 0]) for i in range(6)
    ]
    # each edit writes its image, then its sidecar: die inside the third edit's image write
    proc = _cli("edit", *map(str, specs), "--no-cache", prelude=KILL_AT.format(call=5))
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    done = sorted(p.name for p in workdir.glob("*.edited.png"))
    assert done == ["k0.edited.png", "k1.edited.png"]
    for png in done:
        Image.open(workdir / png).load()  # every file under a final name is complete
    assert len([p for p in workdir.iterdir() if p.name.endswith(".tmp")]) == 1
    r = runner.invoke(app, ["edit", *map(str, specs), "--no-cache", "--skip-existing", "--json"])
    recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.exit_code == 0 and [x["skipped"] for x in recs] == [True, True] + [False] * 4
    assert len(list(workdir.glob("*.edited.png"))) == 6
    assert not [p for p in workdir.iterdir() if p.name.endswith(".tmp")]  # the dead run's leftover


def test_ctrl_c_stops_after_the_current_step_with_a_summary(tiny_sd, workdir):
    specs = [
        tiny_move(workdir, f"c{i}.yaml", tiny_sd, steps=6, offset=[8 + i, 0]) for i in range(4)
    ]
    proc = _cli("edit", *map(str, specs), "--no-cache", prelude=INTERRUPT_AFTER_FIRST_RESULT)
    _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted at step" in err
    assert err.count("not run (interrupted)") == 2 and "1 done, 3 failed" in err
    assert sorted(p.name for p in workdir.glob("*.edited.png")) == ["c0.edited.png"]
    assert not [p for p in workdir.iterdir() if p.name.endswith(".tmp")]


INTERRUPT_MID_INVERSION = """
import atexit, os, signal, sys
import dragonctl.inversion as inversion
_step, _calls = inversion.inversion_step, [0, None]
def inversion_step(*args):
    _calls[0] += 1
    if _calls[0] == 2:  # Ctrl-C in the middle of the first inversion
        _calls[1] = _calls[0]
        os.kill(os.getpid(), signal.SIGINT)
    return _step(*args)
inversion.inversion_step = inversion_step
atexit.register(lambda: print(f"inversion steps after the signal: {_calls[0] - _calls[1]}",
                              file=sys.stderr))
"""


def test_ctrl_c_mid_inversion_stops_at_the_next_step_and_keeps_the_old_output(tiny_sd, workdir):
    spec = tiny_move(workdir, "m.yaml", tiny_sd, steps=12, output="out/m.png")
    old = png_bytes(np.zeros((4, 4, 3), np.uint8), record={"spec_file": "m.yaml"})
    (workdir / "out").mkdir(exist_ok=True)
    (workdir / "out" / "m.png").write_bytes(old)  # an earlier result dragonctl may replace
    proc = _cli("edit", str(spec), "--no-cache", prelude=INTERRUPT_MID_INVERSION)
    _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert "interrupted at inversion step 2 of 12" in err
    assert "inversion steps after the signal: 0" in err  # the step in progress was the last
    assert (workdir / "out" / "m.png").read_bytes() == old
    assert [p.name for p in (workdir / "out").iterdir()] == ["m.png"]


INTERRUPT_WHILE_LOADING = """
import os, signal, time
import dragonctl.models as models
def load_bundle(*args, **kwargs):  # a load blocked in one call that would take two minutes
    os.kill(os.getpid(), signal.SIGINT)
    t0 = time.monotonic()
    try:
        time.sleep(120)
    finally:
        open("slept", "w").write(f"{time.monotonic() - t0:.1f}")
models.load_bundle = load_bundle
"""


def test_ctrl_c_while_a_model_loads_stops_at_once(tiny_sd, workdir):
    spec = tiny_move(workdir, "m.yaml", tiny_sd)
    proc = _cli("edit", str(spec), "--no-cache", prelude=INTERRUPT_WHILE_LOADING, cwd=workdir)
    _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "aborted" in err and "0 done" in err
    assert float((workdir / "slept").read_text()) < 60  # the blocking call was cut short
    assert not list(workdir.glob("*.edited.png"))


def test_damaged_cache_entry_is_detected_reported_and_recomputed(tiny_sd, workdir):
    spec = tiny_move(workdir, "m.yaml", tiny_sd)
    cache = workdir / "cache"
    assert runner.invoke(app, ["edit", str(spec), "--cache-dir", str(cache)]).exit_code == 0
    entry = next((cache / "trajectories").glob("*.safetensors"))
    data = entry.read_bytes()
    entry.write_bytes(data[: len(data) // 2])
    r = runner.invoke(app, ["edit", str(spec), "--cache-dir", str(cache), "--json"])
    rec = json.loads(r.stdout.splitlines()[0])
    assert r.exit_code == 0 and rec["inversions"] == 1
    assert any("damaged" in w for w in rec["warnings"])
    entry.write_bytes(entry.read_bytes()[:-8] + b"\0" * 8)  # flipped bytes in the tensor body
    rec = json.loads(
        runner.invoke(
            app, ["edit", str(spec), "--cache-dir", str(cache), "--json"]
        ).stdout.splitlines()[0]
    )
    assert rec["inversions"] == 1


def test_cache_evicts_least_recently_used_above_its_cap(tmp_path):
    import torch

    from dragonctl.cache import TrajectoryKey

    cache = TrajectoryCache(tmp_path, cap_bytes=10_000)
    keys = [TrajectoryKey.of(bytes([i]), {"model": "m"}, {}, (8, 8), 4, "") for i in range(3)]
    t = torch.zeros(600)  # 2.4 kB each
    now = time.time()
    for age, key in ((30, keys[0]), (20, keys[1])):
        cache.put(key, t)
        os.utime(cache._path(key), (now - age, now - age))
    assert cache.get(keys[0]) is not None  # a read refreshes 0: 1 is now the least recently used
    cache.cap_bytes = 6_000
    cache.put(keys[2], t)
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None
    assert cache.get(keys[2]) is not None


def test_cache_location_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DRAGONCTL_CACHE", str(tmp_path / "c"))
    r = runner.invoke(app, ["cache", "info"])
    assert f"location: {tmp_path / 'c'}" in r.output and "entries: 0" in r.output


def test_two_cpu_workers_split_a_batch_by_source(tiny_sd, tmp_path):
    for s in range(2):
        save_png(tmp_path / f"src{s}.png", scene_image(40, 56, (8 + 4 * s, 10, 24 + 4 * s, 26)))
    specs = [
        tiny_move(tmp_path, f"w{k}.yaml", tiny_sd, f"src{k % 2}.png", offset=[10 + k, 0])
        for k in range(4)
    ]
    reports = api.edit(
        specs, api.EditOptions(device="cpu,cpu", no_cache=True, out_dir=tmp_path / "out")
    )
    assert all(r.ok for r in reports), [r.errors for r in reports]
    assert sum(r.inversions for r in reports) == 2
    assert len(list((tmp_path / "out").glob("*.png"))) == 4


def test_same_spec_gives_the_same_bytes_in_another_process(tiny_sd, workdir):
    spec = tiny_move(workdir, "r.yaml", tiny_sd, guidance={"method": "diffeditor"}, steps=12)
    outs = []
    for i in range(2):
        proc = _cli(
            "edit", str(spec), "--no-cache", "--no-metadata", "--out", str(workdir / f"run{i}")
        )
        proc.communicate(timeout=300)
        assert proc.returncode == 0
        outs.append((workdir / f"run{i}" / "r.png").read_bytes())
    assert outs[0] == outs[1]


def test_non_image_and_directory_inputs(workdir):
    (workdir / "folder.png").mkdir()
    (workdir / "data.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    for name, image, reason in [
        ("d.yaml", "folder.png", "is a directory"),
        ("n.yaml", "data.png", "not an image Pillow can decode"),
        ("u.yaml", "", "at least 1 character"),
    ]:
        spec = write_spec(
            workdir, name, image=image, mode="move", mask={"box": [0, 0, 4, 4]}, offset=[1, 0]
        )
        r = runner.invoke(app, ["validate", str(spec)])
        assert r.exit_code == 2 and f"{spec}: image:" in r.output and reason in r.output, r.output


def test_an_interrupt_while_an_image_and_its_sidecar_are_written_waits_for_both(tmp_path):
    written = []
    with pytest.raises(KeyboardInterrupt):
        with files.written_together():
            files.atomic_write(tmp_path / "a.png", b"png")
            files.interrupt_now()  # Ctrl-C between the two files
            written.append("sidecar")
            files.atomic_write(tmp_path / "a.json", b"{}")
    assert written == ["sidecar"] and (tmp_path / "a.json").read_bytes() == b"{}"
    with pytest.raises(KeyboardInterrupt):
        files.interrupt_now()  # outside a pair: at once
    with files.written_together():  # nothing pending is left behind
        pass
