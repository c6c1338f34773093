#!/usr/bin/env python
"""Predict a folder of images with a SOLO model and write COCO results (docs/predictions.md).

    python tools/predict.py --config-file CONFIG --input DIR|GLOB|FILE... --output preds.json \\
        [--format rle|polygons] [--masks-dir DIR] [--gt-json gt.json] [--tile auto|SIZE] \\
        [--overlap PX] [--no-whole-image-pass] [--batch-size N] --opts MODEL.WEIGHTS model_final.pth

Writes one COCO result per instance (``image_id``, ``file_name``, ``category_id`` in the
dataset's ids, ``score``, ``segmentation`` as RLE or polygons, ``bbox`` and ``area`` of the
mask; :mod:`solo_d2.inference.coco_results`), loadable by ``COCO.loadRes`` and Detectron2's
``visualize_json_results.py``. ``--gt-json``: image ids from that json (matched by file name)
and COCO mask AP printed at the end. ``--tile``: tiled inference of large images
(:class:`solo_d2.inference.TiledPredictor`).

Exit status: 0 all images written; 1 some images could not be read (named at the end; the
others' results are written); 2 a known error (bad option, config, output path, weights): one
line, nothing written (``--debug``: with the traceback).
"""
import argparse
import collections
import glob
import json
import os
import sys
import time

import _common  # noqa: F401  (puts the repository's solo_d2 first on sys.path)

from solo_d2.utils.cli import IMAGE_EXTENSIONS, UserError, add_debug_flag, plan_outputs, run_main

#: Exit status when some images could not be read (the others' results are written).
EXIT_PARTIAL = 1


def get_parser():
    parser = argparse.ArgumentParser(
        prog="tools/predict.py", description="Predict images with SOLO and write COCO results.")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", required=True, metavar="DIR|GLOB|FILE",
                        help="image files, folders (their image files, not recursive) or glob "
                             "patterns, e.g. 'images/*.jpg'")
    parser.add_argument("--output", required=True, metavar="FILE.json", help="the results file")
    parser.add_argument("--format", choices=("rle", "polygons"), default="rle",
                        help="segmentation as RLE (default) or polygons (holes dropped)")
    parser.add_argument("--masks-dir", metavar="DIR",
                        help="also write one indexed PNG per image (pixel = instance index + 1)")
    parser.add_argument("--gt-json", metavar="FILE",
                        help="COCO ground truth: image ids from it by file name, mask AP printed")
    parser.add_argument("--min-score", type=float, default=0.0,
                        help="leave out instances scored below it (default 0: all)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="images (or tiles) per model call (default 1)")
    parser.add_argument("--tile", metavar="auto|SIZE",
                        help="tiled inference: 'auto' (tile = the test size, for images more than "
                             "TEST.TILE.MIN_IMAGE_RATIO tiles long) or a tile side in pixels")
    parser.add_argument("--overlap", type=int, metavar="PX",
                        help="pixels shared by neighbouring tiles (default TEST.TILE.OVERLAP)")
    parser.add_argument("--no-whole-image-pass", action="store_true",
                        help="with --tile: tiles only, no whole-image pass for the large objects "
                             "(TEST.TILE.WHOLE_IMAGE_PASS False)")
    parser.add_argument("--allow-partial-weights", action="store_true",
                        help="run even when MODEL.WEIGHTS does not fit the head or is empty")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_debug_flag(parser)
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config options as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth")
    return parser


def expand_inputs(patterns):
    """Image paths (sorted within each folder or pattern) of files, folders and glob patterns;
    raises naming a pattern, folder or file that gives no image."""
    paths = []
    for p in patterns:
        if glob.has_magic(p):
            matches = sorted(m for m in glob.glob(os.path.expanduser(p)) if os.path.isfile(m))
            if not matches:
                raise FileNotFoundError(f"--input {p}: no file matches this pattern")
            paths.extend(matches)
        elif os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(p, f)))
            if not found:
                raise FileNotFoundError(f"--input {p}: a folder without image files "
                                        f"({', '.join(IMAGE_EXTENSIONS)})")
            paths.extend(found)
        elif os.path.isfile(p):
            paths.append(p)
        else:
            raise FileNotFoundError(f"--input {p}: no such file or folder")
    seen, unique = set(), []
    for p in paths:  # an image given twice (overlapping patterns) is predicted once
        if os.path.realpath(p) not in seen:
            seen.add(os.path.realpath(p))
            unique.append(p)
    return unique


def check_output(output, inputs, gt_json=None):
    """Raise a clear error for an ``--output`` that cannot be written or would overwrite an
    input (an image or the ground truth)."""
    if os.path.isdir(output) or output.endswith(("/", os.sep)):
        raise UserError(f"--output {output}: a folder; give a file name, e.g. "
                        f"{os.path.join(output, 'predictions.json')}")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--output {output}: folder {os.path.dirname(output) or parent} "
                                "does not exist (create it first)")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"--output {output}: folder {parent} is not writable")
    out = os.path.realpath(output)
    for p in list(inputs) + ([gt_json] if gt_json else []):
        if os.path.realpath(p) == out:
            raise UserError(f"--output {output}: is the input {p}; it would be overwritten")


def gt_image_ids(gt_json, paths):
    """``{path: image_id}`` from a COCO json, matched by file name (the json's ``file_name``
    relative path, or else its base name); raises naming the images it lacks."""
    with open(gt_json) as f:
        images = json.load(f).get("images", [])
    by_rel = {im["file_name"].replace("\\", "/"): im["id"] for im in images}
    by_base = {}
    for im in images:
        by_base.setdefault(os.path.basename(im["file_name"]), []).append(im["id"])
    ids, missing = {}, []
    for p in paths:
        norm = p.replace("\\", "/")
        rel = [k for k in by_rel if norm.endswith("/" + k) or norm == k]
        base = by_base.get(os.path.basename(p), [])
        if rel:
            ids[p] = by_rel[max(rel, key=len)]
        elif len(base) == 1:
            ids[p] = base[0]
        else:
            missing.append(p)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(f"--gt-json {gt_json}: no image of file name {', '.join(missing[:5])}{more}"
                        " (or several of that base name)")
    return ids


def category_ids(cfg, gt_json=None):
    """The dataset's category id of each contiguous class (module docs): the test dataset's
    ``thing_dataset_id_to_contiguous_id``, else the ``--gt-json``'s sorted category ids, else
    the metadata's ``json_file``'s, else None (the contiguous ids are written)."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if len(cfg.DATASETS.TEST) else None
    mapping = getattr(meta, "thing_dataset_id_to_contiguous_id", None) if meta else None
    if mapping:
        inverse = {v: k for k, v in mapping.items()}
        return [inverse[i] for i in range(len(inverse))]
    for source in (gt_json, getattr(meta, "json_file", None) if meta else None):
        if source and os.path.isfile(source):
            with open(source) as f:
                cats = sorted(c["id"] for c in json.load(f).get("categories", []))
            if len(cats) == cfg.MODEL.SOLO.NUM_CLASSES:
                return cats
    return None


def build_predictor(cfg, args):
    """SOLOPredictor, wrapped in a TiledPredictor with ``--tile``."""
    from solo_d2 import SOLOPredictor
    from solo_d2.inference import TiledPredictor

    predictor = SOLOPredictor(cfg, allow_partial_weights=args.allow_partial_weights or None)
    if not args.tile:
        return predictor
    return TiledPredictor(cfg, predictor)


def tile_opts(args):
    """Config options of ``--tile`` / ``--overlap`` / ``--no-whole-image-pass`` /
    ``--batch-size``."""
    opts = ["TEST.TILE.BATCH_SIZE", str(args.batch_size)]
    if args.tile:
        if args.tile == "auto":
            opts += ["TEST.TILE.SIZE", "0"]
        else:
            try:
                size = int(args.tile)
            except ValueError:
                raise UserError(f"--tile {args.tile}: expected 'auto' or a tile side in pixels")
            opts += ["TEST.TILE.SIZE", str(size), "TEST.TILE.MIN_IMAGE_RATIO", "0.0"]
    if args.overlap is not None:
        opts += ["TEST.TILE.OVERLAP", str(args.overlap)]
    if args.no_whole_image_pass:
        opts += ["TEST.TILE.WHOLE_IMAGE_PASS", "False"]
    return opts


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: expected >= 1")
    if args.overlap is not None and not args.tile:
        raise UserError("--overlap needs --tile")
    if args.no_whole_image_pass and not args.tile:
        raise UserError("--no-whole-image-pass needs --tile")
    paths = expand_inputs(args.input)
    check_output(args.output, paths, args.gt_json)
    if args.gt_json and not os.path.isfile(args.gt_json):
        raise FileNotFoundError(f"--gt-json {args.gt_json}: no such file")
    ids = gt_image_ids(args.gt_json, paths) if args.gt_json else {p: i + 1 for i, p in enumerate(paths)}
    mask_files = {}
    if args.masks_dir:
        if os.path.exists(args.masks_dir) and not os.path.isdir(args.masks_dir):
            raise UserError(f"--masks-dir {args.masks_dir}: exists and is not a folder")
        mask_files = dict(plan_outputs(paths, args.masks_dir.rstrip("/\\") + os.sep, ext=".png"))

    import cv2
    import tqdm
    from detectron2.utils.logger import setup_logger

    from solo_d2.config import check_tile_config, get_solo_cfg
    from solo_d2.inference import evaluate_segm, indexed_mask_image, instances_to_coco_results
    from solo_d2.utils.file_io import atomic_write
    from solo_d2.visualize import read_image_bgr

    setup_logger(name="fvcore")
    logger = setup_logger(name="solo_d2.predict")
    cfg = get_solo_cfg(args.config_file, list(args.opts) + tile_opts(args))
    if args.tile:
        check_tile_config(cfg)  # before loading the weights
    cats = category_ids(cfg, args.gt_json)
    predictor = build_predictor(cfg, args)
    if args.masks_dir:
        os.makedirs(args.masks_dir, exist_ok=True)

    results, failed, start = [], [], time.time()
    batch = 1 if args.tile else args.batch_size  # tiles are batched inside the tiler
    bar = tqdm.tqdm(total=len(paths), unit="img", disable=args.no_progress, file=sys.stderr)
    for i in range(0, len(paths), batch):
        chunk, images = [], []
        for p in paths[i:i + batch]:
            try:
                images.append(read_image_bgr(p))
                chunk.append(p)
            except (OSError, ValueError) as e:
                failed.append((p, str(e)))
        outputs = ([predictor(images[0])] if args.tile else predictor.predict_batch(images)) if images else []
        for p, out in zip(chunk, outputs):
            inst = out["instances"].to("cpu")
            res = instances_to_coco_results(inst, ids[p], p, cats, args.format, args.min_score)
            results.extend(res)
            if args.masks_dir:
                keep = inst[inst.scores >= args.min_score] if args.min_score > 0 else inst
                if not cv2.imwrite(mask_files[p], indexed_mask_image(keep)):
                    raise OSError(f"{mask_files[p]}: cannot write the mask image")
        bar.update(len(paths[i:i + batch]))
    bar.close()
    text = json.dumps(results)
    atomic_write(args.output, lambda f: f.write(text), mode="w")
    done = len(paths) - len(failed)
    elapsed = time.time() - start
    logger.info(f"{len(results)} instances of {done} images written to {args.output} "
                f"({elapsed:.1f}s, {done / max(elapsed, 1e-9):.2f} images/s)")
    if args.gt_json:
        max_dets = max([100] + list(collections.Counter(r["image_id"] for r in results).values()))
        metrics = evaluate_segm(args.gt_json, results, max_dets=max_dets,
                                image_ids=[ids[p] for p in paths if p not in dict(failed)])
        print(f"COCO mask AP on {done} images (up to {max_dets} detections per image): "
              + ", ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
    if failed:
        print(f"predict.py: {len(failed)} of {len(paths)} images could not be read (their results "
              f"are missing from {args.output}):", file=sys.stderr)
        for p, why in failed:
            print(f"  {why}", file=sys.stderr)
        return EXIT_PARTIAL
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="predict.py", known=(ValueError,)))
