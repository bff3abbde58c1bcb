"""How long `dragonctl edit` takes to exit after Ctrl-C, sent at several moments of one edit.

    python -m benchmarks.ctrl_c [SPEC] [--at 0.3 1 2 4 6 8 10]

Each run starts the edit afresh (--no-cache, 1 thread), sends SIGINT `at` seconds after the start,
and reports the exit status, the seconds from the signal to the exit, and whether an output was
written.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(spec: Path, at: float) -> tuple[int, float, bool, str]:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = ["dragonctl", "edit", str(spec), "--no-cache", "--threads", "1", "--out", out]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        time.sleep(at)
        sent = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate()
        took = time.perf_counter() - sent
        written = any(Path(out).rglob("*.png"))
        last = err.decode(errors="replace").strip().splitlines()
        said = [x for x in last if "interrupted at" in x or x == "aborted"] or last[-1:] or [""]
        phase = said[0]
        return proc.returncode, took, written, phase


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec", nargs="?", default="samples/move.yaml")
    ap.add_argument("--at", type=float, nargs="+", default=[0.3, 1, 2, 4, 6, 8, 10])
    args = ap.parse_args()
    print("| Ctrl-C at (s) | exit | signal → exit (s) | output written | what it said |")
    print("|---|---|---|---|---|")
    for at in args.at:
        rc, took, written, phase = one(Path(args.spec), at)
        print(f"| {at:g} | {rc} | {took:.2f} | {'yes' if written else 'no'} | {phase[-70:]} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
