#!/usr/bin/env python
"""How far two evaluations' predictions are apart (e.g. float32 against bfloat16 inference):
reads the ``coco_instances_results.json`` that Detectron2's COCOEvaluator wrote for each and
matches, per image, each detection of the first to the detection of the second of the same
class with the highest mask IoU.

    python benchmarks/compare_predictions.py A/inference/DATASET/coco_instances_results.json B/... [--min-score 0.3]

Prints the number of detections of each, and for the first's detections scoring at least
``--min-score``: how many have a match of mask IoU >= 0.5 / 0.9 / 1.0 (identical mask), and the
median and maximum score difference of their best matches.
"""
import argparse
import json
import statistics
from collections import defaultdict

from pycocotools import mask as mask_util


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--min-score", type=float, default=0.3)
    a = p.parse_args(argv)
    runs = []
    for path in (a.first, a.second):
        by_image = defaultdict(list)
        with open(path) as f:
            for d in json.load(f):
                by_image[d["image_id"]].append(d)
        runs.append(by_image)
    first, second = runs
    n1, n2 = sum(map(len, first.values())), sum(map(len, second.values()))
    ious, dscores = [], []
    for image_id, dets in first.items():
        for d in dets:
            if d["score"] < a.min_score:
                continue
            same = [e for e in second.get(image_id, []) if e["category_id"] == d["category_id"]]
            if not same:
                ious.append(0.0)
                continue
            iou = mask_util.iou([e["segmentation"] for e in same], [d["segmentation"]], [0])
            best = max(range(len(same)), key=lambda i: iou[i][0])
            ious.append(float(iou[best][0]))
            dscores.append(abs(same[best]["score"] - d["score"]))
    print(f"detections: {n1} (first), {n2} (second)")
    print(f"first's detections scoring >= {a.min_score}: {len(ious)}; best same-class match of mask IoU "
          f">= 0.5: {sum(i >= 0.5 for i in ious)}, >= 0.9: {sum(i >= 0.9 for i in ious)}, "
          f"identical: {sum(i == 1.0 for i in ious)}")
    if dscores:
        print(f"score difference of the best matches: median {statistics.median(dscores):.4f}, "
              f"max {max(dscores):.4f}")


if __name__ == "__main__":
    main()
