#!/usr/bin/env python
"""Run an exported SOLO ONNX model on images with ONNX Runtime, NumPy and OpenCV only (no torch,
no Detectron2), and draw its masks.

    python demo/onnx_demo.py --model out/model.onnx --input img1.png 'more/*.jpg' --output out/

The model comes from ``tools/deploy/export_model.py --format onnx``; the resize settings
(Detectron2's test-time ``ResizeShortestEdge``), the input channel order and the class names are
read from the file's metadata, so no config is needed. Masks are returned at the resized size
and drawn on the original image after resizing them back. An image whose resized size is below
the exported graph's minimum side (``min_input_size``, 65 px for a size divisibility of 32) is
resized up to it, with a warning: the model then sees it larger than the eager model would.

An input is never written over, and inputs of equal names from different folders get their
parent folders in their output names (as ``demo/demo.py``). Errors are one line, exit status 2
(``--debug``: with the traceback).
"""
import argparse
import glob
import json
import os
import sys

import cv2
import numpy as np


def _load_cli():
    """solo_d2/utils/cli.py (standard library only), without importing solo_d2 (which needs torch)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "solo_d2", "utils", "cli.py")
    spec = importlib.util.spec_from_file_location("_solo_d2_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_cli = _load_cli()
UserError = _cli.UserError

__all__ = ["ONNXSOLO", "resize_shortest_edge_size", "draw", "UserError"]

#: Smallest input side of a dynamic export when the file does not say (2 * 32 + 1: two blocks of
#: the usual size divisibility and one pixel; solo_d2.deploy.exporter.size_bounds).
DEFAULT_MIN_INPUT_SIZE = 65


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

        if os.path.isdir(path):
            raise UserError(f"--model {path!r} is a folder: give the model.onnx inside it")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--model {path!r} does not exist")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's InvalidProtobuf, Fail, ...
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"--model {path}: not an ONNX model that ONNX Runtime can load "
                            f"({type(e).__name__}: {detail}); export one with "
                            "tools/deploy/export_model.py --format onnx") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in ("input_format", "min_size_test", "max_size_test") if k not in meta]
        if missing:
            raise UserError(f"{path}: no {missing} in the ONNX metadata; export it with "
                            "tools/deploy/export_model.py")
        self.input_format = meta["input_format"]
        self.min_size, self.max_size = int(meta["min_size_test"]), int(meta["max_size_test"])
        self.class_names = json.loads(meta.get("class_names", "[]"))
        static = meta.get("static_size", "")
        self.static_size = tuple(int(s) for s in static.split(",")) if static else None
        self.min_input_size = int(meta.get("min_input_size", DEFAULT_MIN_INPUT_SIZE))

    def input_size(self, h, w):
        """The (h, w) the model runs on for an (h, w) image, and a warning (str) or None: the test
        resize, then (dynamic exports) scaled up so that both sides are at least
        ``min_input_size``."""
        if self.static_size:
            return self.static_size, None
        size = resize_shortest_edge_size(h, w, self.min_size, self.max_size)
        if min(size) >= self.min_input_size:
            return size, None
        scale = self.min_input_size / min(size)
        up = (max(int(np.ceil(size[0] * scale)), self.min_input_size),
              max(int(np.ceil(size[1] * scale)), self.min_input_size))
        return up, (f"the {w}x{h} image resizes to {size[1]}x{size[0]}, below the exported model's "
                    f"minimum side {self.min_input_size}: run at {up[1]}x{up[0]} instead (results "
                    "may differ from the eager model's)")

    def prepare(self, bgr):
        """BGR (H, W, 3) uint8 -> the model's (3, h, w) uint8 input (resized, channel order)."""
        h, w = bgr.shape[:2]
        size, warning = self.input_size(h, w)
        if warning:
            print(f"onnx_demo.py: warning: {warning}", file=sys.stderr)
        image = bgr[:, :, ::-1] if self.input_format == "RGB" else bgr
        if size != (h, w):
            # Detectron2's ResizeTransform: PIL bilinear for uint8; OpenCV's INTER_LINEAR is close
            # but not the same filter when shrinking (see docs/deploy.md).
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
    """The command line (module docs); raises the errors that :func:`run` prints in one line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model.onnx from tools/deploy/export_model.py")
    p.add_argument("--input", required=True, nargs="+", help="image files or glob patterns")
    p.add_argument("--output", required=True,
                   help="output image file (one input) or folder (several inputs)")
    p.add_argument("--confidence-threshold", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=0)
    _cli.add_debug_flag(p)
    args = p.parse_args(argv)
    files = [f for pattern in args.input for f in (sorted(glob.glob(pattern)) or [pattern])]
    for f in files:
        if os.path.isdir(f):
            raise UserError(f"--input {f}: a folder: use '{os.path.join(f, '*.png')}' (or *.jpg ...)")
        if not os.path.isfile(f):
            raise FileNotFoundError(f"--input {f}: no such image file")
    pairs = _cli.plan_outputs(files, args.output)  # refuses to write over an input
    model = ONNXSOLO(args.model, args.threads)
    for f, out in pairs:
        bgr = cv2.imread(f, cv2.IMREAD_COLOR)
        if bgr is None:
            raise UserError(f"cannot read image {f!r}")
        pred = model(bgr)
        try:
            os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
            written = cv2.imwrite(out, draw(bgr, pred, model.class_names, args.confidence_threshold))
        except (cv2.error, OSError) as e:
            detail = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
            raise UserError(f"--output {args.output}: cannot write {out!r} ({detail})") from None
        if not written:
            raise UserError(f"--output {args.output}: cannot write {out!r} (no permission, or no "
                            "image format for its extension)")
        print(f"{f}: {int((pred['scores'] >= args.confidence_threshold).sum())} detections "
              f"(of {len(pred['scores'])}) -> {out}")


if __name__ == "__main__":
    sys.exit(_cli.run_main(main, prog="onnx_demo.py"))
