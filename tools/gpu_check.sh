#!/usr/bin/env bash
# One prepared check for a GPU machine (docs/gpu.md): everything goes to one folder.
#
#   bash tools/gpu_check.sh [--out DIR] [--device cuda|cpu] [--smoke] [--skip-pytest] [--models M...]
#
# Steps (each under its own time budget, so the whole check ends within about 8 minutes on one
# GPU with 16 CPU cores; a step that runs out is recorded as such in summary.txt and the check
# goes on):
#   1. env.txt: the machine (nvidia-smi, torch and CUDA versions);
#   2. pytest.txt: `pytest -q` of the whole suite (tests/test_cuda.py runs where CUDA is);
#   3. latency.{txt,json}: tools/benchmark.py latency: whole inference per stage, batch 1 and 8,
#      float32, float16 and bfloat16 (SOLO: MODEL.SOLO.INFERENCE_DTYPE; Mask R-CNN: autocast),
#      500 calibrated candidates with object-like masks, the dtypes and batches of a model
#      interleaved in one process (their ratios hold);
#   4. train.{txt,json}: training step time and peak memory, float32 and AMP, interleaved;
#   5. syncs.{txt,json}: host-device syncs per image (dispatch-mode census; on CUDA also
#      torch.cuda.set_sync_debug_mode), batch 1 and 8;
#   6. interleaved.txt: SOLO, SOLOv2 and Mask R-CNN float32 at 800x1333, interleaved (the ratios
#      of the issue's goals).
# Models: SOLO, Decoupled SOLO, Decoupled SOLO light, SOLOv2, SOLOv2 light R-18 (random weights,
# calibrated FrozenBN: tools/benchmark.py) and Detectron2's Mask R-CNN R-50-FPN.
#
# --device cpu --smoke --skip-pytest proves the script end to end on a CPU (smallest sizes, one
# timed run, batches 1 and 2, no time budgets); its figures mean nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=output/gpu_check
DEVICE=cuda
SMOKE=0
PYTEST=1
MODELS="SOLO DecoupledSOLO DecoupledSOLO_Light SOLOv2 SOLOv2_Light_R18 MaskRCNN"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --skip-pytest) PYTEST=0; shift ;;
    --models) shift; MODELS=""; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do MODELS="$MODELS $1"; shift; done ;;
    -h|--help) sed -n 2,22p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
if [ "$DEVICE" = cuda ]; then
  THREADS=${THREADS:-16}
else
  THREADS=${THREADS:-1}
fi
export OMP_NUM_THREADS=$THREADS
if [ "$SMOKE" = 1 ]; then
  SIZE=(--size 128 192); RUNS=1; BATCHES="1 2"; INSTANCES=3; NOLIMIT=1
  INTERLEAVED_SIZE=(--size 128 192)
else
  SIZE=(); RUNS=5; BATCHES="1 8"; INSTANCES=10; NOLIMIT=0
  INTERLEAVED_SIZE=(--size 800 1333)
fi
DTYPES="float32 float16 bfloat16"

# step NAME BUDGET_S COMMAND...: runs the command with its output in $OUT/NAME.txt, within its
# budget (none with --smoke), and records the outcome in summary.txt
step() {
  local name=$1 budget=$2; shift 2
  local t0=$SECONDS rc
  echo "== $name: $*" | tee -a "$SUMMARY"
  if [ "$NOLIMIT" = 1 ]; then
    "$@" > "$OUT/$name.txt" 2>&1; rc=$?
  else
    timeout --kill-after=10 "$budget" "$@" > "$OUT/$name.txt" 2>&1; rc=$?
  fi
  local what="exit $rc"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && what="ran out of its ${budget} s budget"
  echo "   $name: $what after $((SECONDS - t0)) s" | tee -a "$SUMMARY"
}

{
  date -u
  echo "device: $DEVICE  smoke: $SMOKE  threads: $THREADS  models: $MODELS"
  git log -1 --oneline 2>/dev/null
  command -v nvidia-smi > /dev/null && nvidia-smi
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
} > "$OUT/env.txt" 2>&1

if [ "$PYTEST" = 1 ]; then
  step pytest 270 $PY -m pytest -q tests
fi
step latency 100 $PY tools/benchmark.py latency --device "$DEVICE" --models $MODELS "${SIZE[@]}" \
  --dtype $DTYPES --batch $BATCHES --candidates 500 --masks objects --runs $RUNS \
  --threads "$THREADS" --json "$OUT/latency.json"
step train 60 $PY tools/benchmark.py train --device "$DEVICE" --models $MODELS "${SIZE[@]}" \
  --train-amp both --instances $INSTANCES --runs $RUNS --threads "$THREADS" --json "$OUT/train.json"
step syncs 30 $PY tools/benchmark.py syncs --device "$DEVICE" --models $MODELS "${SIZE[@]}" \
  --batch $BATCHES --candidates 500 --masks objects --threads "$THREADS" --json "$OUT/syncs.json"
step interleaved 30 $PY benchmarks/interleaved_latency.py --device "$DEVICE" \
  --variants SOLO:float32 SOLOv2:float32 MaskRCNN:float32 "${INTERLEAVED_SIZE[@]}" \
  --runs $RUNS --threads "$THREADS" --masks objects
echo "done: $OUT ($((SECONDS)) s)" | tee -a "$SUMMARY"
