#!/usr/bin/env python
"""Does tiled inference find the small objects of large images that whole-image inference misses
(mask AP, AR, AP_small), without splitting objects at the seams, and at what time and memory?

    python benchmarks/tiling.py --config-file configs/Shapes/DecoupledSOLO_R18_shapes.yaml \\
        --weights /tmp/wt28_out/model/model_final.pth --data /tmp/wt28_out/data_large \\
        --output /tmp/wt28_out/bench_tiling.json

Generates (once) a large-image split of the shapes dataset (``--num-images`` images of 2048 x
2048 with 150-200 shapes of 10-40 px and 8 of 100-400 px, ``tools/generate_shapes.py``'s
options), then predicts it, each mode in its own process (so that its peak memory is its own):

- ``whole``: the image resized to the test size (``SOLOPredictor``, MAX_PER_IMAGE 1000);
- ``tiled``: :class:`solo_d2.inference.TiledPredictor`, ``--tile`` / ``--overlap``, tiles only, seams merged within a class
  (no whole-image pass);
- ``tiled_iou``: the same, seams merged by IoU only (``merge_cover`` 2): what merging fragments
  by cover adds;
- ``tiled_nomerge``: the same without seam merging (``merge_iou`` and ``merge_cover`` 2): what
  the merging removes;
- ``two_pass``: tiles and the whole-image pass (``TEST.TILE.WHOLE_IMAGE_*``), seams merged
  within a class only (``merge_across_classes`` False):
  large objects from the whole image, small ones from the tiles;
- ``two_pass_any_class``: the same, seams also merged across classes (the defaults).

Reports COCO mask AP / AP50 / AP_small / AR (up to 1000 detections per image), the GT objects
crossing a seam (a tile edge inside the image) that are *split* (two or more predictions scored
>= 0.3 each lying at least half inside the object) and, for comparison, the split share of the
other GT objects, seconds per image and the peak RSS above the loaded model, and the bytes of
the kept masks against N full-size bitmaps. Docs: docs/benchmarks/large_images.md.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODES = ("whole", "tiled", "tiled_iou", "tiled_nomerge", "two_pass", "two_pass_any_class")
#: TiledPredictor arguments of each tiled mode (module docs).
TILED = {"tiled": dict(whole_image_pass=False, merge_across_classes=False),
         "tiled_iou": dict(whole_image_pass=False, merge_cover=2.0, merge_across_classes=False),
         "tiled_nomerge": dict(whole_image_pass=False, merge_iou=2.0, merge_cover=2.0),
         "two_pass": dict(whole_image_pass=True, merge_across_classes=False),
         "two_pass_any_class": dict(whole_image_pass=True, merge_across_classes=True)}
SPLIT = "large"
GEN = dict(min_objects=150, max_objects=200, min_size=10.0, max_size=40.0, num_large=8,
           large_size=(100.0, 400.0), max_occlusion=0.3, empty_prob=0.0)


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(args):
    """Predict the split in one mode; write the results and figures to ``args.worker_out``."""
    import numpy as np

    from solo_d2 import SOLOPredictor
    from solo_d2.config import get_solo_cfg
    from solo_d2.inference import TiledPredictor, instances_to_coco_results
    from solo_d2.inference.coco_results import as_cropped_masks
    from solo_d2.visualize import read_image_bgr

    opts = ["MODEL.WEIGHTS", args.weights, "MODEL.DEVICE", "cpu"]
    if args.worker == "whole":
        opts += ["MODEL.SOLO.MAX_PER_IMAGE", "1000"]
    cfg = get_solo_cfg(args.config_file, opts)
    predictor = SOLOPredictor(cfg)
    if args.worker != "whole":
        predictor = TiledPredictor(predictor, tile_size=args.tile, overlap=args.overlap,
                                   min_image_ratio=0.0, max_per_image=1000,
                                   **TILED[args.worker], nms_kernel=cfg.MODEL.SOLO.NMS_KERNEL,
                                   nms_sigma=cfg.MODEL.SOLO.NMS_SIGMA,
                                   update_thresh=cfg.MODEL.SOLO.UPDATE_THRESH_TEST)
    with open(os.path.join(args.data, SPLIT + ".json")) as f:
        images = json.load(f)["images"]
    predictor(read_image_bgr(os.path.join(args.data, SPLIT, images[0]["file_name"]))[:256, :256])
    base = rss_mb()
    results, seconds, kept_bytes, full_bytes = [], [], [], []
    for im in images:
        image = read_image_bgr(os.path.join(args.data, SPLIT, im["file_name"]))
        start = time.perf_counter()
        inst = predictor(image)["instances"].to("cpu")
        seconds.append(time.perf_counter() - start)
        masks = as_cropped_masks(inst)
        kept_bytes.append(sum(b.nbytes for b in masks.bitmaps) if args.worker != "whole"
                          else int(np.prod(inst.pred_masks.shape)))
        full_bytes.append(len(inst) * image.shape[0] * image.shape[1])
        results += instances_to_coco_results(inst, im["id"], im["file_name"], [1, 2, 3, 4])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"results": results, "seconds": seconds, "rss_after_load_mb": base, "peak_rss_mb": peak,
           "kept_mask_bytes": kept_bytes, "full_mask_bytes": full_bytes}
    with open(args.worker_out, "w") as f:
        json.dump(out, f)


def seam_splits(gt_json, results, tile, overlap, min_score=0.3):
    """``(crossing, split, elsewhere, split_elsewhere)``: the GT objects crossing a seam and how
    many of them are split (module docs); the same for the other GT objects (what the model
    splits or duplicates without any seam)."""
    import numpy as np
    import pycocotools.mask as mask_util
    from pycocotools.coco import COCO

    from solo_d2.inference import tile_windows

    coco = COCO(gt_json)
    crossing = split = elsewhere = split_elsewhere = 0
    for img in coco.dataset["images"]:
        h, w = img["height"], img["width"]
        wins = np.array(tile_windows(h, w, tile, overlap))
        xs = sorted(set(wins[:, 0][wins[:, 0] > 0]) | set(wins[:, 2][wins[:, 2] < w]))
        ys = sorted(set(wins[:, 1][wins[:, 1] > 0]) | set(wins[:, 3][wins[:, 3] < h]))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        dts = [r for r in results if r["image_id"] == img["id"] and r["score"] >= min_score]
        on_seam = np.array([any(a["bbox"][0] < e < a["bbox"][0] + a["bbox"][2] for e in xs)
                            or any(a["bbox"][1] < e < a["bbox"][1] + a["bbox"][3] for e in ys)
                            for a in anns], dtype=bool)
        crossing += int(on_seam.sum())
        elsewhere += int((~on_seam).sum())
        if not anns or not dts:
            continue
        gts = [coco.annToRLE(a) for a in anns]
        inside = mask_util.iou([d["segmentation"] for d in dts], gts, [1] * len(gts))  # inter / dt
        is_split = (np.asarray(inside) >= 0.5).sum(axis=0) >= 2
        split += int((is_split & on_seam).sum())
        split_elsewhere += int((is_split & ~on_seam).sum())
    return crossing, split, elsewhere, split_elsewhere


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--data", required=True, help="folder of the large split (made if missing)")
    parser.add_argument("--output", required=True, help="json of the figures")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    from solo_d2.data.shapes import generate_shapes_dataset
    from solo_d2.inference import evaluate_segm

    gt_json = os.path.join(args.data, SPLIT + ".json")
    if not os.path.isfile(gt_json):
        generate_shapes_dataset(args.data, SPLIT, args.num_images, (args.image_size,) * 2, seed=2,
                                progress=False, **GEN)
    figures = {}
    for mode in args.modes:
        part = f"{args.output}.{mode}.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--config-file", args.config_file,
               "--weights", args.weights, "--data", args.data, "--output", args.output,
               "--tile", str(args.tile), "--overlap", str(args.overlap), "--worker", mode,
               "--worker-out", part]
        subprocess.run(cmd, check=True)
        with open(part) as f:
            run = json.load(f)
        os.remove(part)
        metrics = evaluate_segm(gt_json, run["results"], max_dets=1000)
        crossing, split, elsewhere, split_elsewhere = seam_splits(
            gt_json, run["results"], args.tile, args.overlap)
        figures[mode] = {
            **{k: round(metrics[k], 1) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR", "ARs")},
            "instances_per_image": round(len(run["results"]) / max(len(run["seconds"]), 1), 1),
            "seam_crossing_gt": crossing, "split_at_seams": split,
            "other_gt": elsewhere, "split_elsewhere": split_elsewhere,
            "seconds_per_image": round(sum(run["seconds"]) / len(run["seconds"]), 2),
            "peak_rss_above_model_mb": round(run["peak_rss_mb"] - run["rss_after_load_mb"], 1),
            "kept_mask_mb_max": round(max(run["kept_mask_bytes"]) / 2**20, 2),
            "full_bitmaps_mb_max": round(max(run["full_mask_bytes"]) / 2**20, 1),
        }
        print(mode, json.dumps(figures[mode]), flush=True)
    with open(args.output, "w") as f:
        json.dump({"args": vars(args), "figures": figures}, f, indent=1)
    keys = list(next(iter(figures.values())))
    print("| mode | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for mode, row in figures.items():
        print(f"| {mode} | " + " | ".join(str(row[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
