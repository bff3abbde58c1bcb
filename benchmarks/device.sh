#!/usr/bin/env bash
# One command for a lent GPU machine (see README, "Development"): the speed table, eager and compiled,
# then a shapes-training chunk with what time is left. Everything lands in $OUT (speed.json, logs,
# the exported weights). Run with `.whl` carried (diffusers and pydantic are not installed there):
#   carry: [".whl", "checkpoints"]   command: bash benchmarks/device.sh
# TRAIN_MINUTES (default 4) sizes the training chunk; SPEED=0 skips the speed table.
set -uo pipefail
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [ "${SPEED:-1}" != 0 ]; then
  python3 -m dragonctl bench speed --mode move --resolution 512 --resolution 768 \
    --compile off --compile on --out "$OUT/speed.json" 2>&1 | tee "$OUT/speed.log"
  python3 -m dragonctl bench speed --resolution 512 --out "$OUT/speed_modes.json" 2>&1 | tee "$OUT/speed_modes.log"
fi
python3 -m dragonctl.shapes.train --device cuda --batch 256 --workers 12 --steps 1000000 \
  --minutes "${TRAIN_MINUTES:-4}" --export-dir "$OUT/weights" 2>&1 | tail -40 | tee "$OUT/train.log"
