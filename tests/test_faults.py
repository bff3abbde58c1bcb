"""Faults and abuse: batches that survive bad specs, atomic outputs under injected errors and SIGKILL,
Ctrl-C, cache damage, eviction, multi-device workers, reproducibility across processes."""

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

runner = CliRunner()


def tiny_move(folder: Path, name: str, model: Path, image: str = "src.png", **over) -> Path:
    fields = dict(image=image, mode="move", mask={"box": [8, 10, 24, 26]}, offset=[12, 2], model=str(model), steps=3,
                  resolution=32)
    return write_spec(folder, name, **{**fields, **over})


def test_batch_of_50_over_5_sources_with_5_broken(tiny_sd, tmp_path):
    for s in range(5):
        save_png(tmp_path / f"src{s}.png", scene_image(40, 56, (8 + s, 10, 24 + s, 26)))
    specs = []
    for k in range(50):
        s = k % 5
        if k % 10 == 9:  # five broken ones, each broken differently
            bad = [dict(offset=[900, 0]), dict(image="nope.png"), dict(mode="spin"), dict(steps="x"),
                   dict(mask={"box": [0, 0, 99, 99]})][k // 10]
            specs.append(tiny_move(tmp_path, f"s{k:02d}.yaml", tiny_sd, **{"image": f"src{s}.png", **bad}))
        else:
            specs.append(tiny_move(tmp_path, f"s{k:02d}.yaml", tiny_sd, f"src{s}.png", offset=[10 + k % 7, 1]))
    r = runner.invoke(app, ["edit", str(tmp_path), "--out", str(tmp_path / "out"), "--json", "--no-cache"])
    assert r.exit_code == 1
    recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(recs) == 50 and sum(x["ok"] for x in recs) == 45
    assert len(list((tmp_path / "out").glob("*.png"))) == 45
    assert sum(x["inversions"] for x in recs) == 5  # each source inverted once, not 45 times
    failed = [line for line in r.stderr.splitlines() if line.startswith("failed: ")]
    assert sorted({line.split(":")[1].strip() for line in failed}) == sorted(str(specs[k]) for k in range(9, 50, 10))


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_injected_write_errors_leave_no_partial_file_and_keep_the_old_one(tiny_sd, workdir, monkeypatch, err):
    spec = tiny_move(workdir, "m.yaml", tiny_sd, output="out/m.png")
    (workdir / "out").mkdir()
    (workdir / "out" / "m.png").write_bytes(b"old result")
    real_open = open

    class Failing:
        def __init__(self, path, mode):
            self.fh = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[: len(data) // 2])  # half of it reaches the disk, then the disk is "full"
            raise OSError(err, os.strerror(err))

    monkeypatch.setattr(files, "open", lambda p, m: Failing(p, m), raising=False)
    r = runner.invoke(app, ["edit", str(spec), "--no-cache"])
    assert r.exit_code == 1
    line = [x for x in r.stderr.splitlines() if x.startswith("failed:")][0]
    assert f"{spec}: output: cannot write" in line and os.strerror(err) in line
    assert (workdir / "out" / "m.png").read_bytes() == b"old result"
    assert [p.name for p in (workdir / "out").iterdir()] == ["m.png"]  # no temporary left behind


def test_atomic_write_survives_sigkill_at_random_moments(tmp_path):
    target = tmp_path / "big.bin"
    a, b = b"A" * (8 << 20), b"B" * (8 << 20)
    target.write_bytes(a)
    code = ("import sys; from pathlib import Path; from dragonctl.files import atomic_write\n"
            "p = Path(sys.argv[1]); i = 0\n"
            "while True:\n    atomic_write(p, (b'B' if i % 2 == 0 else b'A') * (8 << 20)); i += 1\n")
    rng = np.random.default_rng(0)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", code, str(target)])
        time.sleep(0.3 + float(rng.uniform(0, 0.4)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = target.read_bytes()
        assert data in (a, b)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    files.remove_stale_temporaries(tmp_path)
    assert all(not p.exists() for p in leftovers)


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "dragonctl", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kw)


def _wait_for(path: Path, timeout: float = 300) -> None:
    t0 = time.time()
    while not path.exists():
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_killed_batch_leaves_no_partial_output_and_the_next_run_resumes(tiny_sd, workdir):
    specs = [tiny_move(workdir, f"k{i}.yaml", tiny_sd, steps=8, offset=[8 + i, 0]) for i in range(6)]
    proc = _cli("edit", *map(str, specs), "--no-cache")
    _wait_for(workdir / "k1.edited.json")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for png in workdir.glob("*.edited.png"):
        Image.open(png).load()  # every file under a final name is complete
    done_before = {p.name for p in workdir.glob("*.edited.png")}
    assert 2 <= len(done_before) < 6
    r = runner.invoke(app, ["edit", *map(str, specs), "--no-cache", "--skip-existing", "--json"])
    recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.exit_code == 0 and sum(x["skipped"] for x in recs) >= len(done_before) - 1
    assert len(list(workdir.glob("*.edited.png"))) == 6
    assert not [p for p in workdir.iterdir() if p.name.endswith(".tmp")]  # stale temporaries were removed


def test_ctrl_c_stops_after_the_current_step_with_a_summary(tiny_sd, workdir):
    specs = [tiny_move(workdir, f"c{i}.yaml", tiny_sd, steps=30, offset=[8 + i, 0]) for i in range(4)]
    proc = _cli("edit", *map(str, specs), "--no-cache")
    _wait_for(workdir / "c0.edited.json")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert "not run (interrupted)" in err
    done = sorted(p.name for p in workdir.glob("*.edited.png"))
    assert 1 <= len(done) < 4
    for png in done:
        Image.open(workdir / png).load()


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
    rec = json.loads(runner.invoke(app, ["edit", str(spec), "--cache-dir", str(cache), "--json"]).stdout.splitlines()[0])
    assert rec["inversions"] == 1


def test_cache_evicts_least_recently_used_above_its_cap(tmp_path):
    import torch

    cache = TrajectoryCache(tmp_path, cap_bytes=10_000)
    keys = [{"k": i} for i in range(3)]
    t = torch.zeros(600)  # 2.4 kB each
    cache.put(keys[0], t)
    time.sleep(0.02)
    cache.put(keys[1], t)
    time.sleep(0.02)
    assert cache.get(keys[0]) is not None  # refreshes 0: 1 is now the oldest
    time.sleep(0.02)
    cache.cap_bytes = 6_000
    cache.put(keys[2], t)
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and cache.get(keys[2]) is not None


def test_cache_location_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DRAGONCTL_CACHE", str(tmp_path / "c"))
    r = runner.invoke(app, ["cache", "info"])
    assert f"location: {tmp_path / 'c'}" in r.output and "entries: 0" in r.output


def test_two_cpu_workers_split_a_batch_by_source(tiny_sd, tmp_path):
    for s in range(2):
        save_png(tmp_path / f"src{s}.png", scene_image(40, 56, (8 + 4 * s, 10, 24 + 4 * s, 26)))
    specs = [tiny_move(tmp_path, f"w{k}.yaml", tiny_sd, f"src{k % 2}.png", offset=[10 + k, 0]) for k in range(4)]
    reports = api.edit(specs, api.EditOptions(device="cpu,cpu", no_cache=True, out_dir=tmp_path / "out"))
    assert all(r.ok for r in reports), [r.errors for r in reports]
    assert sum(r.inversions for r in reports) == 2
    assert len(list((tmp_path / "out").glob("*.png"))) == 4


def test_same_spec_gives_the_same_bytes_in_another_process(tiny_sd, workdir):
    spec = tiny_move(workdir, "r.yaml", tiny_sd, guidance={"method": "diffeditor"}, steps=12)
    outs = []
    for i in range(2):
        proc = _cli("edit", str(spec), "--no-cache", "--no-metadata", "--out", str(workdir / f"run{i}"))
        proc.communicate(timeout=300)
        assert proc.returncode == 0
        outs.append((workdir / f"run{i}" / "r.png").read_bytes())
    assert outs[0] == outs[1]


def test_non_image_and_directory_inputs(workdir):
    (workdir / "folder.png").mkdir()
    (workdir / "data.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    for name, image, reason in [("d.yaml", "folder.png", "is a directory"), ("n.yaml", "data.png", "cannot decode"),
                                ("u.yaml", "", "at least 1 character")]:
        spec = write_spec(workdir, name, image=image, mode="move", mask={"box": [0, 0, 4, 4]}, offset=[1, 0])
        r = runner.invoke(app, ["validate", str(spec)])
        assert r.exit_code == 2 and f"{spec}: image:" in r.output and (reason in r.output or "decode" in r.output)
