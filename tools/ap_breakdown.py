#!/usr/bin/env python
"""Where a model loses mask AP: COCO mask AP with categories, class-agnostic (categories ignored:
what AP would be with perfect classification) and per class, from the files a Detectron2
evaluation writes.

    python tools/ap_breakdown.py datasets/shapes/val.json \\
        output/demo/inference/shapes_val/coco_instances_results.json

A large gap between the first two lines means the category branch, not the masks, limits AP.
The last line says how well the category branch classifies what the masks find: of the GT
objects that some detection covers (mask or box IoU > 0.5), the fraction whose highest-scoring
covering detection has the right class (chance: 1 / number of classes).
"""
import argparse
import contextlib
import io
import json
import sys

import numpy as np
import pycocotools.mask as mask_util
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


def classification_accuracy(gt, results, iou_type="segm", iou_thresh=0.5):
    """(found, correct): GT objects (crowd excluded) covered by a detection with IoU > iou_thresh,
    and those whose highest-scoring covering detection has the GT's category."""
    by_image = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    key = "segmentation" if iou_type == "segm" else "bbox"
    found = correct = 0
    for img_id in gt.getImgIds():
        anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=img_id)) if not a.get("iscrowd", 0)]
        dets = by_image.get(img_id, [])
        if not anns or not dets:
            continue
        if key == "segmentation":
            gts = [gt.annToRLE(a) for a in anns]
        else:
            gts = [a["bbox"] for a in anns]
        ious = np.asarray(mask_util.iou([d[key] for d in dets], gts, [0] * len(anns)))
        ious = ious.reshape(len(dets), len(anns))
        scores = np.array([d["score"] for d in dets])
        covering = ious > iou_thresh  # (D, G)
        ranked = np.where(covering, scores[:, None], -np.inf)
        best = ranked.argmax(axis=0)
        has = covering.any(axis=0)
        found += int(has.sum())
        correct += sum(dets[b]["category_id"] == a["category_id"]
                       for b, a, h in zip(best, anns, has) if h)
    return found, correct


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
    found, correct = classification_accuracy(gt, results, args.iou_type)
    num_gt = len([a for a in gt.dataset["annotations"] if not a.get("iscrowd", 0)])
    acc = 100 * correct / found if found else float("nan")
    print(f"  classification: {acc:.1f}% right class of the {found} / {num_gt} GT objects found "
          f"(IoU > 0.5; chance {100 / len(gt.getCatIds()):.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
