#!/usr/bin/env bash
# Commands for a lent GPU machine (README, "Development"), each sized to one device call:
#   bash benchmarks/device.sh speed          the speed table: move at 512² and 768², eager and --compile on,
#                                            then every mode at 512² eager (about 5-7 minutes on an H100)
#   bash benchmarks/device.sh train MINUTES  a shapes-training chunk (batch 256), resumed from the package weights
#   bash benchmarks/device.sh all SECONDS    one call for a whole lease: fp16 against fp32 guidance,
#                                            compiled move (inductor's reduce-overhead), K-edit
#                                            batches, the fast preset, CUDA-graph move rows, the
#                                            eager table, SDXL's move at 1024², then training for
#                                            what is left (stages past the budget are skipped)
#   bash benchmarks/device.sh ray            batch throughput on Ray over every GPU of a multi-GPU box
# Carry `.whl` (diffusers and pydantic are not installed there). Results land in $OUT: speed.json and
# speed_modes.json, or the exported model (copy it into dragonctl/shapes/weights/ and commit it).
# At most 8 files come back from $OUT, so logs go to stdout only.
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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

case "${1:-speed}" in
  speed)
    python3 -m dragonctl bench speed --mode move --resolution 512 --resolution 768 \
      --compile off --compile on --out "$OUT/speed.json" || exit 1
    python3 -m dragonctl bench speed --resolution 512 --out "$OUT/speed_modes.json"
    ;;
  train)
    python3 -m dragonctl.shapes.train --device cuda --batch 256 --workers 12 --steps 1000000 --lr 5e-4 \
      --minutes "${2:-6}" --cooldown-share 0.5 --save-every 1000 --export-dir "$OUT/weights" 2>&1 | tail -40
    ;;
  all)
    # Each stage is capped so that the next still runs, and skipped when the budget is spent; bench
    # speed saves its JSON after every row. Output goes to files, not pipes: inductor's compile
    # workers outlive a killed stage and would hold a pipe open (a first lease lost 75 s that way).
    budget=${2:-540}
    stage() {
      local cap=$1; shift
      local left=$((budget - SECONDS - 10))
      [ "$left" -lt 30 ] && { echo "skipped (budget spent): $*"; return; }
      [ "$cap" -gt "$left" ] && cap=$left
      timeout -k 5 "$cap" "$@" >/tmp/stage.log 2>&1; grep -v "Warning\|should be kept in float32" /tmp/stage.log | tail -30
    }
    # fp16 guidance against fp32 with SD 1.5-sized weights (random: the backward's range)
    stage 70 python3 -m dragonctl bench precision --size sd15 --resolution 512 --resolution 768 \
      --out "$OUT/precision.json"
    # the compiled guided steps first (never timed on a GPU yet), then K-edit batches and the fast
    # preset, CUDA graphs at 512² and 768², the eager table
    stage 200 python3 -m dragonctl bench speed --mode move --resolution 512 --compile on \
      --out "$OUT/speed_compiled.json"
    # K edits of one source per loop (K = 1, 4, 8), and the fast preset, eager, move at 512²
    stage 90 python3 -m dragonctl bench speed --mode move --resolution 512 --batch 1 --batch 4 --batch 8 \
      --out "$OUT/speed_batch.json"
    stage 70 python3 -m dragonctl bench speed --mode move --resolution 512 --preset fast \
      --out "$OUT/speed_fast.json"
    # CUDA graphs of the eager kernels (seconds to build), then the eager table
    stage 120 python3 -m dragonctl bench speed --mode move --resolution 512 --resolution 768 --compile cudagraphs \
      --out "$OUT/speed_cudagraphs.json"
    stage 150 python3 -m dragonctl bench speed --mode move --resolution 512 --resolution 768 --mode resize \
      --mode drag --mode appearance --mode paste --out "$OUT/speed_eager.json"
    # SDXL at its real size (random weights), eager, move at 1024²
    stage 100 python3 -m dragonctl bench speed --size sdxl --mode move --resolution 1024 \
      --out "$OUT/speed_sdxl.json"
    left=$((budget - SECONDS - 60))
    if [ "$left" -gt 60 ]; then
      stage $((left + 50)) python3 -m dragonctl.shapes.train --device cuda --batch 256 --workers 12 --steps 1000000 \
        --lr 5e-4 --minutes "$(python3 -c "print($left / 60)")" --cooldown-share 0.5 --save-every 1000 \
        --export-dir "$OUT/weights"
    fi
    ;;
  ray)
    # Multi-GPU boxes only (one worker per GPU), with Ray installed there (its wheel is too large to
    # carry): batch throughput with SD 1.5-sized random weights, 1 worker and one per GPU.
    gpus=$(nvidia-smi -L | wc -l)
    python3 -c "from pathlib import Path; from dragonctl.bench.synthetic import save_sd_folder as s; s(Path('/tmp/sd15'), 'sd15', 'epsilon')"
    python3 -m dragonctl bench ray --model /tmp/sd15 --specs $((4 * gpus)) --workers 1 --workers "$gpus" \
      --out "$OUT/ray"
    ;;
  *)
    echo "usage: bash benchmarks/device.sh speed | train MINUTES | all SECONDS | ray" >&2
    exit 2
    ;;
esac
