#!/usr/bin/env python
"""Where a model loses mask AP: COCO mask AP with categories, class-agnostic (categories ignored:
what AP would be with perfect classification) and per class, from the files a Detectron2
evaluation writes.

    python tools/ap_breakdown.py datasets/shapes/val.json \\
        output/demo/inference/shapes_val/coco_instances_results.json

A large gap between the first two lines means the category branch, not the masks, limits AP.
"""
import argparse
import contextlib
import io
import json
import sys

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def evaluate(gt, dt, iou_type, use_cats=True):
    e = COCOeval(gt, dt, iou_type)
    e.params.useCats = int(use_cats)
    with contextlib.redirect_stdout(io.StringIO()):
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gt_json", help="the dataset's COCO json")
    p.add_argument("results_json", help="coco_instances_results.json written by COCOEvaluator")
    p.add_argument("--iou-type", default="segm", choices=["segm", "bbox"])
    args = p.parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(args.gt_json)
    with open(args.results_json) as f:
        results = json.load(f)
    if not results:
        print(f"{args.results_json}: no detections", file=sys.stderr)
        return 1
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
    rows = {}
    for name, use_cats in (("with categories", True), ("class-agnostic", False)):
        s = evaluate(gt, dt, args.iou_type, use_cats).stats
        rows[name] = s
        print(f"{name:>16}: AP {100 * s[0]:.1f}  AP50 {100 * s[1]:.1f}  AP75 {100 * s[2]:.1f}  "
              f"AR100 {100 * s[8]:.1f}")
    e = evaluate(gt, dt, args.iou_type)
    precision = e.eval["precision"]  # (iou, recall, category, area, max dets)
    for k, cat_id in enumerate(e.params.catIds):
        pk = precision[:, :, k, 0, -1]
        ap = 100 * float(np.mean(pk[pk > -1])) if (pk > -1).any() else float("nan")
        print(f"{gt.cats[cat_id]['name']:>16}: AP {ap:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
