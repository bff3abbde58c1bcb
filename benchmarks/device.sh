#!/usr/bin/env bash
# One command for a lent GPU machine (see README, "Development"): the speed table, eager and compiled,
# then a shapes-training chunk with what time is left. Results land in $OUT (speed.json,
# speed_modes.json, the exported weights); copy the weights into dragonctl/shapes/weights/ to keep them.
# Run with `.whl` carried (diffusers and pydantic are not installed there; README, "Development"):
#   carry: [".whl"]   command: bash benchmarks/device.sh   (training resumes from the package weights)
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
# at most 8 files come back from $OUT: the two speed JSONs and the 5 files of the exported model
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if [ "${SPEED:-1}" != 0 ]; then
  python3 -m dragonctl bench speed --mode move --resolution 512 --resolution 768 \
    --compile off --compile on --out "$OUT/speed.json" 2>&1
  python3 -m dragonctl bench speed --resolution 512 --out "$OUT/speed_modes.json" 2>&1
fi
python3 -m dragonctl.shapes.train --device cuda --batch 256 --workers 12 --steps 1000000 \
  --minutes "${TRAIN_MINUTES:-4}" --export-dir "$OUT/weights" 2>&1 | tail -40
