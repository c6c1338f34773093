#!/usr/bin/env python
"""``make demo``: generate the shapes dataset, train Decoupled SOLO on it from scratch with
train_net.py for a fixed time on this machine, evaluate (COCO mask AP on shapes_val) and draw
ground truth beside predictions.

    python tools/demo_run.py                      # what `make demo` runs (11 minutes of training)
    python tools/demo_run.py --train-minutes 0    # the config's whole schedule (3000 iterations)
    python tools/demo_run.py --skip-training      # only draw, with OUTPUT/model_final.pth
    python tools/demo_run.py --config-file configs/Shapes/SOLO_R18_shapes.yaml \\
        --output output/demo_solo --opts SOLVER.MAX_ITER 500   # vanilla SOLO

Training is sized to the machine (``SOLVER.TIME_BUDGET_MINUTES``): a short probe of the step time
chooses how many of the config's 3000 iterations fit ``--train-minutes`` and the faster memory
layout; the log says what it chose. Mixed precision is used where the CPU has native bfloat16,
float32 elsewhere (:func:`solo_d2.config.autocast_dtype`).

Everything goes to ``--output`` (default ``output/demo``): train_net.py's log and metrics, the
model ``model_final.pth``, the evaluation and ``vis/*.png``.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common  # noqa: E402
from _common import REPO, load_cfg

DEFAULT_CONFIG = "configs/Shapes/DecoupledSOLO_R18_shapes.yaml"


def banner(text):
    print(f"\n==== {text} ====", flush=True)


def final_metrics(output_dir):
    """The last line of train_net's ``metrics.json`` holding ``segm/AP``, or None."""
    path = Path(output_dir) / "metrics.json"
    if not path.is_file():
        return None
    found = None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "segm/AP" in row:
            found = row
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--output", default="output/demo", help="output folder")
    parser.add_argument("--num-vis", type=int, default=4, help="validation images to draw")
    parser.add_argument("--confidence-threshold", type=float, default=0.3,
                        help="minimum score drawn in the pictures (default 0.3)")
    parser.add_argument("--skip-training", action="store_true",
                        help="do not train: draw with OUTPUT/model_final.pth")
    parser.add_argument("--train-minutes", type=int, default=11,
                        help="minutes of training the schedule is fitted to on this machine "
                             "(SOLVER.TIME_BUDGET_MINUTES; default 11, so that set-up, data, "
                             "training and evaluation fit 15 minutes); 0: the config's MAX_ITER")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="extra config options for train_net.py (KEY VALUE ...)")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    start = time.time()

    from detectron2.data import DatasetCatalog

    from solo_d2.engine.time_budget import TIME_BUDGET_FILE
    from solo_d2.visualize import setup_demo_cfg, visualize_dataset

    cfg = load_cfg(args.config_file, args.opts)  # importing solo_d2 registers the shapes datasets

    banner("1/4 dataset")
    t = time.time()
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        n = len(DatasetCatalog.get(name))  # generated on first use (datasets/shapes)
        print(f"{name}: {n} images", flush=True)
    print(f"ready in {time.time() - t:.1f}s", flush=True)

    weights = os.path.join(args.output, "model_final.pth")
    if not args.skip_training:
        banner("2/4 training and 3/4 evaluation (train_net.py)")
        cmd = [sys.executable, "train_net.py", "--config-file", args.config_file,
               "OUTPUT_DIR", args.output, "SOLVER.TIME_BUDGET_MINUTES", str(args.train_minutes),
               *args.opts]
        print("$ " + " ".join(cmd), flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"demo: train_net.py failed with exit status {rc}", file=sys.stderr)
            return rc
    elif not os.path.isfile(weights):
        print(f"demo: {weights} not found: train first (without --skip-training)",
              file=sys.stderr)
        return 1

    banner("4/4 drawing predictions")
    vis_cfg = setup_demo_cfg(args.config_file,
                             list(args.opts) + ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", args.output],
                             args.confidence_threshold)
    paths = visualize_dataset(vis_cfg, vis_cfg.DATASETS.TEST[0], os.path.join(args.output, "vis"),
                              num_images=args.num_vis,
                              confidence_threshold=args.confidence_threshold)
    for p in paths:
        print(p)

    banner("summary")
    metrics = final_metrics(args.output)
    if metrics is not None:
        print(f"mask AP on {cfg.DATASETS.TEST[0]}: {metrics['segm/AP']:.1f} "
              f"(AP50 {metrics.get('segm/AP50', float('nan')):.1f}, "
              f"AP75 {metrics.get('segm/AP75', float('nan')):.1f}); "
              f"box AP {metrics.get('bbox/AP', float('nan')):.1f}")
    budget = Path(args.output) / TIME_BUDGET_FILE
    if budget.is_file() and args.train_minutes:
        fit = json.loads(budget.read_text())
        print(f"training: {fit['max_iter']} iterations in {fit['minutes']} minutes on "
              f"{fit['machine']} ({'channels-last' if fit['channels_last'] else 'standard'} layout)")
    print(f"model: {weights}")
    print(f"pictures (ground truth | prediction): {os.path.join(args.output, 'vis')}/")
    print(f"total time: {time.time() - start:.0f}s")
    print("next: python demo/demo.py --config-file " + args.config_file
          + " --input 'datasets/shapes/val/*.png' --output " + os.path.join(args.output, "pred")
          + " --opts MODEL.WEIGHTS " + weights)
    return 0


if __name__ == "__main__":
    sys.exit(_common.run_tool(main))  # known errors: one line, exit 2
