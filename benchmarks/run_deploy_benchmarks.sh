#!/bin/sh
# The deploy figures (docs/benchmarks/deploy.md): parity of the exported models with eager PyTorch (the shapes
# demo model on 20 shapes_val images + COCO evaluation; every head type with random weights at
# 800x1333 and 512x852) and latency (SOLO R-50 800x1333, Decoupled SOLO light 512x852).
# Usage: SOLO_D2_DATASETS=/work/datasets sh benchmarks/run_deploy_benchmarks.sh DEMO_CONFIG DEMO_WEIGHTS
# (no set -e: a failing comparison exits 1 and the next one still runs)
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
PY=${PYTHON:-python}
# One thread per runtime: the CPU is shared, and under load a 2-thread eager PyTorch spends much
# of its time waiting at OpenMP barriers, which would flatter ONNX Runtime.
CMP="$PY benchmarks/compare_exported.py --threads 1"
C=configs/COCO-InstanceSegmentation
VAL="DATASETS.TEST ('shapes_val',)"
$CMP --config-file $C/SOLO_R50_1x.yaml --random-weights --size 800 1333 --images 3 --latency 5 $VAL
$CMP --config-file $C/DecoupledSOLO_Light_R50_3x.yaml --random-weights --size 512 852 --images 3 --latency 5 $VAL
for size in "800 1333" "512 852"; do
  [ "$size" = "800 1333" ] || $CMP --config-file $C/SOLO_R50_1x.yaml --random-weights --size $size --images 3 $VAL
  $CMP --config-file $C/DecoupledSOLO_R50_1x.yaml --random-weights --size $size --images 3 $VAL
  [ "$size" = "512 852" ] || $CMP --config-file $C/DecoupledSOLO_Light_R50_3x.yaml --random-weights --size $size --images 3 $VAL
  $CMP --config-file $C/DecoupledSOLO_Light_R50_3x.yaml --random-weights --size $size --images 3 $VAL MODEL.SOLO.HEAD_TYPE DecoupledSOLOCompactHead
done
$CMP --config-file "$1" --images 20 --include-empty --eval --latency 5 MODEL.WEIGHTS "$2"
