#!/usr/bin/env python
"""Where the pre-NMS top-k goes: the reference's order against ``MODEL.SOLO.NMS_PRE_BEFORE_MASKS``.

    python benchmarks/nms_pre_order.py [--model SOLO|DecoupledSOLO|DecoupledSOLO_Light] [--candidates 2000] [--runs 3]

Builds the model of ``tools/benchmark.py`` (random weights, FrozenBN calibrated on the image,
category bias 0 and re-drawn mask output weights, so that there are masks to rank), runs backbone
and head once on a random 800x1333 image (512x852 for the light model), sets
``SCORE_THRESH_TEST`` so that ``--candidates`` (cell, class) pairs pass it after point NMS (more
than ``NMS_PRE`` = 500), then times the postprocess (mask formation, area filter, maskness,
top-k, Matrix NMS, pasting) on the same head outputs in both orders:

- reference (default): masks of all candidates, area filter, maskness, then the top ``NMS_PRE``;
- ``NMS_PRE_BEFORE_MASKS``: the top ``NMS_PRE`` by category score first, masks of those only.

Prints the time (median over ``--runs``), the detections of each, and how many of the
reference's detections have no detection with the same class and the same mask in the other.
"""
import argparse
import statistics
import time

import _setup  # noqa: F401  (the checkout's solo_d2 and tools/ first on sys.path)
import torch

from _setup import MODELS, bench_image, prepared_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SOLO", choices=["SOLO", "DecoupledSOLO", "DecoupledSOLO_Light"])
    p.add_argument("--candidates", type=int, default=2000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from solo_d2.modeling.postprocessing import point_nms

    h, w = MODELS[args.model][1]
    image = bench_image(h, w)
    model = prepared_model(args.model, image)  # the score threshold is set below
    batch = [{"image": image}]
    with torch.no_grad():
        images = model.preprocess_image(batch)
        features = model.run_backbone(images.tensor)
        cate, mask_feats = model.head([features[f] for f in model.in_features])
        probs = torch.cat([point_nms(c[0].sigmoid()).flatten() for c in cate])
        thresh = probs.topk(args.candidates + 1).values[-1].item()
        pp = model.postprocess
        pp.score_thresh = thresh
        results, times = {}, {}
        for before in (False, True, False, True) * args.runs:
            pp.nms_pre_before_masks = before
            start = time.perf_counter()
            out = model.inference_from_outputs(cate, mask_feats, images, batch)[0]["instances"]
            times.setdefault(before, []).append(time.perf_counter() - start)
            results[before] = out
    n = int((probs > thresh).sum())
    ref, cheap = results[False], results[True]
    unmatched = 0
    for k in range(len(ref)):
        same = (cheap.pred_classes == ref.pred_classes[k]) & (
            cheap.pred_masks == ref.pred_masks[k]
        ).flatten(1).all(dim=1)
        unmatched += int(not same.any())
    print(f"{args.model} {h}x{w}: {n} candidates above SCORE_THRESH_TEST {thresh:.6f}, NMS_PRE {pp.nms_pre}")
    for before, name in ((False, "reference order (default)"), (True, "NMS_PRE_BEFORE_MASKS True")):
        t = [x * 1000 for x in times[before]]
        out = results[before]
        print(f"  {name}: postprocess {statistics.median(t):.0f} ms median ({min(t):.0f}-{max(t):.0f}), {len(out)} detections")
    print(f"  reference detections without the same (class, mask) in the other: {unmatched} of {len(ref)}")


if __name__ == "__main__":
    main()
