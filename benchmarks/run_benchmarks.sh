#!/usr/bin/env bash
# The CPU speed, memory, target-generation, FLOP and equal-time figures (docs/benchmarks/) come from
# this script (CPU); the other figures (make demo, the learning runs, step times, the soak) name
# their own command beside them. Fixed thread count (THREADS, default 1): on a shared machine
# compare only ratios measured within one command. Models whose config is not in the checkout
# are skipped with a note.
#   bash benchmarks/run_benchmarks.sh [OUT_DIR]
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-output/benchmarks}
PY=${PY:-.venv/bin/python}
T=${THREADS:-1}
mkdir -p "$OUT"
export OMP_NUM_THREADS=$T
# Interleaved comparisons (robust ratios on a loaded machine): bfloat16, SOLOv2, Mask R-CNN
$PY benchmarks/interleaved_latency.py --variants SOLO:float32 SOLO:bfloat16 SOLOv2:float32 MaskRCNN:float32 --runs 5 --threads $T --masks objects | tee "$OUT/interleaved_800.txt"
$PY benchmarks/interleaved_latency.py --variants SOLO:float32 SOLO:bfloat16 --size 512 852 --runs 5 --threads $T --masks objects | tee "$OUT/interleaved_512.txt"
# Inference per stage, float32 and bfloat16 (MODEL.SOLO.INFERENCE_DTYPE), 500 forced candidates
# with object-like masks
$PY tools/benchmark.py latency --dtype float32 bfloat16 --masks objects --runs 5 --threads $T --json "$OUT/latency.json" | tee "$OUT/latency.txt"
$PY benchmarks/paste_time.py --masks 100 --runs 5 --threads $T | tee "$OUT/paste_time.txt"
$PY benchmarks/profile_postprocess.py --model SOLO --threads $T | tee "$OUT/profile_postprocess.txt"
# Inference against input size and number of candidates
$PY tools/benchmark.py scaling --models SOLO --masks objects --runs 5 --threads $T --json "$OUT/scaling.json" | tee "$OUT/scaling.txt"
# The head's layout (the head alone, then whole inferences)
$PY benchmarks/head_layout.py --model SOLO --runs 3 --threads $T | tee "$OUT/head_layout.txt"
$PY benchmarks/head_layout.py --model SOLO --runs 5 --threads $T --pipeline | tee "$OUT/head_layout_pipeline.txt"
# Training steps, target generation
$PY tools/benchmark.py train --models SOLO_S2 SOLO DecoupledSOLO DecoupledSOLO_Light SOLOv2 SOLOv2_Light MaskRCNN --runs 5 --threads $T --json "$OUT/train.json" | tee "$OUT/train.txt"
$PY tools/benchmark.py targets --runs 3 --threads $T --json "$OUT/targets.json" | tee "$OUT/targets.txt"
# FLOPs and parameters
for c in SOLO_R50_1x DecoupledSOLO_R50_1x SOLOv2_R50_1x; do
  [ -f configs/COCO-InstanceSegmentation/$c.yaml ] || { echo "$c: not in this checkout"; continue; }
  $PY tools/analyze_model.py --config-file configs/COCO-InstanceSegmentation/$c.yaml --size 800 1333 --json "$OUT/flops_$c.json" | tail -2
done
$PY tools/analyze_model.py --config-file configs/COCO-InstanceSegmentation/DecoupledSOLO_Light_R50_3x.yaml --size 512 852 --json "$OUT/flops_DecoupledSOLO_Light_R50_3x.json" | tail -2
$PY tools/analyze_model.py --model-zoo COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml --size 800 1333 --json "$OUT/flops_mask_rcnn_R_50_FPN_1x.json" | tail -2
$PY benchmarks/equal_time.py --minutes "${EQUAL_MINUTES:-5}" --points 3 --output "$OUT/equal_time" --plot docs/ap_vs_time.png | tail -3
