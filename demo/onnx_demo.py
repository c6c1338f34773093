#!/usr/bin/env python
"""Run an exported SOLO ONNX model on images with ONNX Runtime, NumPy and OpenCV only (no torch,
no Detectron2), and draw its masks.

    python demo/onnx_demo.py --model out/model.onnx --input img1.png 'more/*.jpg' --output out/

The model comes from ``tools/deploy/export_model.py --format onnx``; the resize settings
(Detectron2's test-time ``ResizeShortestEdge``), the input channel order and the class names are
read from the file's metadata, so no config is needed. Masks are returned at the resized size
and drawn on the original image after resizing them back.
"""
import argparse
import glob
import json
import os
import sys

import cv2
import numpy as np

__all__ = ["ONNXSOLO", "resize_shortest_edge_size", "draw"]


def resize_shortest_edge_size(h, w, short, max_size):
    """Output (h, w) of Detectron2's ``ResizeShortestEdge.get_output_shape`` (at least 1)."""
    scale = short * 1.0 / min(h, w)
    newh, neww = (short, scale * w) if h < w else (scale * h, short)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return max(int(newh + 0.5), 1), max(int(neww + 0.5), 1)


class ONNXSOLO:
    """An exported SOLO model in ONNX Runtime: BGR image in, predictions at the image's size out."""

    def __init__(self, path, threads=0):
        import onnxruntime as ort

        if not os.path.isfile(path):
            raise FileNotFoundError(f"--model {path!r} does not exist")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in ("input_format", "min_size_test", "max_size_test") if k not in meta]
        if missing:
            raise ValueError(f"{path}: no {missing} in the ONNX metadata; export it with "
                             "tools/deploy/export_model.py")
        self.input_format = meta["input_format"]
        self.min_size, self.max_size = int(meta["min_size_test"]), int(meta["max_size_test"])
        self.class_names = json.loads(meta.get("class_names", "[]"))
        static = meta.get("static_size", "")
        self.static_size = tuple(int(s) for s in static.split(",")) if static else None

    def prepare(self, bgr):
        """BGR (H, W, 3) uint8 -> the model's (3, h, w) uint8 input (resized, channel order)."""
        h, w = bgr.shape[:2]
        size = self.static_size or resize_shortest_edge_size(h, w, self.min_size, self.max_size)
        image = bgr[:, :, ::-1] if self.input_format == "RGB" else bgr
        if size != (h, w):
            # Detectron2's ResizeTransform: PIL bilinear for uint8; OpenCV's INTER_LINEAR is close
            # but not the same filter when shrinking (see README "Deploy").
            image = cv2.resize(np.ascontiguousarray(image), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(image.transpose(2, 0, 1))

    def __call__(self, bgr):
        """Predictions for a BGR (H, W, 3) uint8 image: dict of ``masks`` (N, H, W) bool at the
        image's size, ``scores``, ``classes``, ``boxes`` (XYXY, image pixels)."""
        if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
            raise ValueError("expected a BGR (H, W, 3) uint8 image")
        h, w = bgr.shape[:2]
        x = self.prepare(bgr)
        masks, scores, classes, boxes = self.session.run(None, {"image": x})
        rh, rw = x.shape[1:]
        if (rh, rw) != (h, w) and len(masks):
            masks = np.stack([cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) > 0.5
                              for m in masks])
            boxes = boxes * np.array([w / rw, h / rh, w / rw, h / rh], np.float32)
        elif (rh, rw) != (h, w):
            masks = np.zeros((0, h, w), bool)
        return {"masks": masks.astype(bool), "scores": scores, "classes": classes, "boxes": boxes}


def draw(bgr, pred, class_names=(), score_thresh=0.5, alpha=0.5):
    """The image with each prediction above ``score_thresh`` drawn: mask tinted, contour, label."""
    out = bgr.copy()
    rng = np.random.default_rng(0)
    for m, s, c in zip(pred["masks"], pred["scores"], pred["classes"]):
        if s < score_thresh:
            continue
        colour = rng.integers(64, 256, 3).tolist()
        out[m] = (out[m] * (1 - alpha) + np.array(colour) * alpha).astype(np.uint8)
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, 1)
        ys, xs = np.nonzero(m)
        if len(xs):
            name = class_names[c] if c < len(class_names) else str(int(c))
            cv2.putText(out, f"{name} {s:.2f}", (int(xs.min()), max(int(ys.min()) - 2, 8)),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.35, colour, 1, cv2.LINE_AA)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model.onnx from tools/deploy/export_model.py")
    p.add_argument("--input", required=True, nargs="+", help="image files or glob patterns")
    p.add_argument("--output", required=True,
                   help="output image file (one input) or folder (several inputs)")
    p.add_argument("--confidence-threshold", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    files = [f for pattern in args.input for f in (sorted(glob.glob(pattern)) or [pattern])]
    try:
        model = ONNXSOLO(args.model, args.threads)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"onnx_demo: {e}")
    many = len(files) > 1 or os.path.isdir(args.output)
    if many:
        os.makedirs(args.output, exist_ok=True)
    for f in files:
        bgr = cv2.imread(f, cv2.IMREAD_COLOR)
        if bgr is None:
            sys.exit(f"onnx_demo: cannot read image {f!r}")
        pred = model(bgr)
        out = os.path.join(args.output, os.path.basename(f)) if many else args.output
        if not cv2.imwrite(out, draw(bgr, pred, model.class_names, args.confidence_threshold)):
            sys.exit(f"onnx_demo: cannot write {out!r}")
        print(f"{f}: {int((pred['scores'] >= args.confidence_threshold).sum())} detections "
              f"(of {len(pred['scores'])}) -> {out}")


if __name__ == "__main__":
    main()
