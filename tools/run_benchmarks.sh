#!/usr/bin/env bash
# The speed, memory, target-generation, FLOP and equal-time figures of BENCHMARKS.md come from
# this script (CPU, 2 threads, one quiet machine); the other figures (make demo, the learning
# runs, step times, the soak) name their own command beside them.
#   bash tools/run_benchmarks.sh [OUT_DIR]        (about 35 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-output/benchmarks}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
export OMP_NUM_THREADS=2
MODELS="SOLO DecoupledSOLO DecoupledSOLO_Light MaskRCNN"
$PY tools/benchmark.py train   --models SOLO_S2 $MODELS --runs 5  --json "$OUT/train.json"   | tee "$OUT/train.txt"
$PY tools/benchmark.py latency --models $MODELS --runs 10 --json "$OUT/latency.json" | tee "$OUT/latency.txt"
$PY tools/benchmark.py targets --runs 3 --json "$OUT/targets.json" | tee "$OUT/targets.txt"
for c in SOLO_R50_1x DecoupledSOLO_R50_1x; do
  $PY tools/analyze_model.py --config-file configs/COCO-InstanceSegmentation/$c.yaml --size 800 1333 --json "$OUT/flops_$c.json" | tail -2
done
$PY tools/analyze_model.py --config-file configs/COCO-InstanceSegmentation/DecoupledSOLO_Light_R50_3x.yaml --size 512 852 --json "$OUT/flops_DecoupledSOLO_Light_R50_3x.json" | tail -2
$PY tools/analyze_model.py --model-zoo COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml --size 800 1333 --json "$OUT/flops_mask_rcnn_R_50_FPN_1x.json" | tail -2
$PY tools/equal_time.py --minutes "${EQUAL_MINUTES:-5}" --points 3 --output "$OUT/equal_time" --plot docs/ap_vs_time.png | tail -3
