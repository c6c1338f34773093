#!/usr/bin/env python
"""Export a SOLO / Decoupled SOLO model, post-processing included, to ONNX or ``torch.export``
(Detectron2's ``tools/deploy/export_model.py``, for solo_d2).

    python tools/deploy/export_model.py --config-file configs/Shapes/DecoupledSOLO_R18_shapes.yaml \\
        --format onnx --output out/ MODEL.WEIGHTS output/demo/model_final.pth
    python tools/deploy/export_model.py --config-file CONFIG --format torch-export --output out/ \\
        --run-eval MODEL.WEIGHTS W

The exported model follows the deploy contract (docs/deploy.md, :mod:`solo_d2.deploy`): one
(3, H, W) uint8 image in ``INPUT.FORMAT``, already resized by the test transform, any H and W
(``--static-size H W``: that size only); outputs ``masks`` (N, H, W) bool, ``scores`` (N,)
float32, ``classes`` (N,) int64, ``boxes`` (N, 4) float32 XYXY. ONNX goes to ``DIR/model.onnx``
(with the resize settings and class names as metadata for ``demo/onnx_demo.py``),
``torch.export`` to ``DIR/model.pt2``. ``--run-eval`` evaluates the exported file (not the eager
model) on ``DATASETS.TEST`` with Detectron2's COCO evaluator.

Errors naming a file, key or value are one line, exit status 2 (``--debug``: with the traceback).

TorchScript (Detectron2's ``--format torchscript``) is not offered: it is deprecated in the
pinned torch, and ``torch.export`` is its successor.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from solo_d2.utils.cli import UserError, add_debug_flag, run_main  # noqa: E402

FORMATS = {"onnx": "model.onnx", "torch-export": "model.pt2"}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--output", required=True, metavar="DIR", help="folder of the exported file")
    p.add_argument("--sample-image", metavar="FILE",
                   help="image to trace with (default: a synthetic one of the test size)")
    p.add_argument("--static-size", type=int, nargs=2, metavar=("H", "W"),
                   help="export a fixed-size graph for this (already resized) input size")
    p.add_argument("--run-eval", action="store_true",
                   help="evaluate the exported model on DATASETS.TEST")
    p.add_argument("--allow-partial-weights", action="store_true",
                   help="accept an empty MODEL.WEIGHTS (random weights) or weights that do not fit")
    p.add_argument("--threads", type=int, default=0, help="torch / ONNX Runtime threads (0: default)")
    add_debug_flag(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return p


def setup_logging():
    """Log the export (``solo_d2.deploy``) and Detectron2's messages, among them the evaluation
    summary of ``--run-eval`` (``print_csv_format``'s ``copypaste`` lines), to stdout."""
    from detectron2.utils.logger import setup_logger

    setup_logger(name="fvcore")
    setup_logger()  # "detectron2"
    return setup_logger(name="solo_d2.deploy")


def resized_image(cfg, bgr):
    """A BGR HxWx3 uint8 image -> (3, h, w) uint8 tensor in INPUT.FORMAT, resized as the test
    transform does (what the exported model expects)."""
    import numpy as np
    import torch
    from detectron2.data import transforms as T

    image = bgr[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else bgr
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = aug.get_transform(image).apply_image(np.ascontiguousarray(image))
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


def sample_input(cfg, args, bounds=None):
    """The (3, h, w) uint8 sample to trace with; ``bounds`` = (min, max) side of a dynamic
    export: a ``--sample-image`` that the test resize takes outside them is refused (before
    resizing: a very thin image would resize to 0 pixels)."""
    import cv2
    import numpy as np
    import torch
    from detectron2.data import transforms as T

    if args.sample_image:
        bgr = cv2.imread(args.sample_image, cv2.IMREAD_COLOR)
        if bgr is None:
            raise UserError(f"cannot read --sample-image {args.sample_image!r}")
        h, w = bgr.shape[:2]
        size = T.ResizeShortestEdge.get_output_shape(h, w, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        if bounds and not args.static_size and not all(bounds[0] <= s <= bounds[1] for s in size):
            raise UserError(
                f"--sample-image {args.sample_image}: its {w}x{h} pixels resize (INPUT.MIN_SIZE_TEST "
                f"{cfg.INPUT.MIN_SIZE_TEST}, MAX_SIZE_TEST {cfg.INPUT.MAX_SIZE_TEST}) to {size[1]}x{size[0]}, "
                f"outside the [{bounds[0]}, {bounds[1]}] px sides a dynamic export accepts; give a less "
                "elongated image (or none: a synthetic one of the test size)")
        image = resized_image(cfg, bgr)
        if args.static_size and tuple(image.shape[1:]) != tuple(args.static_size):
            image = torch.nn.functional.interpolate(
                image[None].float(), size=tuple(args.static_size), mode="bilinear"
            )[0].round().clamp(0, 255).to(torch.uint8)
        return image
    if args.static_size:
        h, w = args.static_size
    else:
        h = int(cfg.INPUT.MIN_SIZE_TEST)
        w = min(int(cfg.INPUT.MAX_SIZE_TEST), h * 4 // 3)
    rng = np.random.default_rng(0)
    return torch.as_tensor(rng.integers(0, 256, (3, h, w), dtype=np.uint8))


def main(argv=None):
    """The command line (module docs); returns the path written. Raises the errors that the
    ``__main__`` block prints in one line (:func:`solo_d2.utils.cli.run_main`)."""
    args = get_parser().parse_args(argv)
    if not os.path.isfile(args.config_file):
        raise UserError(f"--config-file {args.config_file!r} does not exist")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UserError(f"--output {args.output}: a file; give the folder to write "
                        f"{FORMATS[args.format]} into")
    import torch
    from detectron2.data import MetadataCatalog

    import solo_d2  # noqa: F401  (registers the meta-architecture, heads and datasets)
    from solo_d2.config import get_solo_cfg
    from solo_d2.deploy import SOLODeployModel
    from solo_d2.deploy.exporter import deploy_metadata, export_onnx, export_torch, size_bounds
    from solo_d2.predictor import SOLOPredictor

    logger = setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_solo_cfg(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"  # exported on the CPU: the graph is device-independent
    if cfg.MODEL.META_ARCHITECTURE != "SOLO":
        raise UserError(f"MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}, not 'SOLO'")
    if args.run_eval and not len(cfg.DATASETS.TEST):  # known before exporting
        raise UserError("--run-eval needs DATASETS.TEST (empty in this config)")
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise UserError(f"MODEL.WEIGHTS {weights!r} does not exist")
    cfg.freeze()
    predictor = SOLOPredictor(cfg, allow_partial_weights=args.allow_partial_weights or None)
    wrapper = SOLODeployModel(predictor.model).eval()
    sample = sample_input(cfg, args, size_bounds(wrapper))
    if not args.static_size:
        lo, hi = size_bounds(wrapper)
        if not all(lo <= s <= hi for s in sample.shape[1:]):
            raise UserError(f"the sample's resized size {tuple(sample.shape[1:])} is "
                            f"outside [{lo}, {hi}]; give another --sample-image")
    names = None
    if len(cfg.DATASETS.TEST):
        names = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes", None)
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, FORMATS[args.format])
    static = bool(args.static_size)
    logger.info(f"exporting {cfg.MODEL.SOLO.HEAD_TYPE} with a {tuple(sample.shape)} sample "
                f"({'static' if static else 'dynamic'} size) to {path}")
    ep = export_torch(wrapper, sample, static=static)
    if args.format == "torch-export":
        torch.export.save(ep, path)
    else:
        export_onnx(wrapper, sample, path, static=static, exported_program=ep,
                    metadata=deploy_metadata(cfg, names, args.static_size, size_bounds(wrapper)))
    logger.info(f"wrote {path}")
    if args.run_eval:
        run_eval(cfg, path, args.format, args.output, args.threads)
    return path


def run_eval(cfg, path, fmt, output_dir, threads=0):
    """Evaluate the exported file on DATASETS.TEST with Detectron2's COCO evaluator."""
    from detectron2.evaluation import inference_on_dataset, print_csv_format

    from solo_d2.deploy.runtime import ExportedSOLO, onnx_runner, torch_export_runner
    from solo_d2.engine import Trainer

    if not len(cfg.DATASETS.TEST):
        raise UserError("--run-eval needs DATASETS.TEST (empty in this config)")
    run = onnx_runner(path, threads) if fmt == "onnx" else torch_export_runner(path)
    model = ExportedSOLO(run)
    results = {}
    for name in cfg.DATASETS.TEST:
        loader = Trainer.build_test_loader(cfg, name)
        evaluator = Trainer.build_evaluator(cfg, name, os.path.join(output_dir, "inference", name))
        results[name] = inference_on_dataset(model, loader, evaluator)
        print_csv_format(results[name])
    return results


if __name__ == "__main__":
    sys.exit(run_main(main, prog="export_model.py"))
