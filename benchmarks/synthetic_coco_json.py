#!/usr/bin/env python
"""Write a synthetic COCO-format json of a given size (no images), to time the dataset tools.

    python benchmarks/synthetic_coco_json.py --annotations 100000 --output output/synthetic_100k.json

Images are 640 x 480 or 480 x 640 (COCO's usual sizes), 7 annotations each (COCO's mean);
each annotation is a random 16-vertex polygon (an ellipse) with a log-uniform scale of 4 to 400
px, 1% of them crowd, 80 categories. Deterministic (``--seed``).
"""
import argparse
import json

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", type=int, default=100000)
    p.add_argument("--per-image", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    n_img = -(-args.annotations // args.per_image)
    images = []
    for i in range(n_img):
        w, h = (640, 480) if rng.random() < 0.7 else (480, 640)
        images.append({"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": w, "height": h})
    anns = []
    ang = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    for k in range(args.annotations):
        im = images[k // args.per_image]
        s = float(np.exp(rng.uniform(np.log(4), np.log(400))))
        a = float(rng.uniform(0.5, 2.0))
        bw, bh = min(s * a ** 0.5, im["width"] - 1), min(s / a ** 0.5, im["height"] - 1)
        cx, cy = rng.uniform(bw / 2, im["width"] - bw / 2), rng.uniform(bh / 2, im["height"] - bh / 2)
        xs, ys = cx + bw / 2 * np.cos(ang), cy + bh / 2 * np.sin(ang)
        poly = np.stack([xs, ys], 1).round(2).reshape(-1).tolist()
        anns.append({
            "id": k + 1, "image_id": im["id"], "category_id": int(rng.integers(1, 81)),
            "segmentation": [poly], "bbox": [round(cx - bw / 2, 2), round(cy - bh / 2, 2), round(bw, 2), round(bh, 2)],
            "area": round(float(np.pi * bw * bh / 4), 2), "iscrowd": int(rng.random() < 0.01),
        })
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, 81)]
    with open(args.output, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    print(args.output, len(images), "images", len(anns), "annotations")


if __name__ == "__main__":
    main()
