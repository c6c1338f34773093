#!/usr/bin/env python
"""Mask AP against training wall-clock time: SOLO, Decoupled SOLO, SOLOv2 and Mask R-CNN trained
from scratch for the same minutes on the built-in shapes dataset, on this machine.

    python benchmarks/equal_time.py --minutes 8 --points 4 --output output/equal_time

SOLOv2 is the SOLO config with ``SOLOv2Head`` and the mask feature sizes and warm-up of
``configs/Shapes/SOLOv2_R18_shapes.yaml`` (E = 64, 64-channel mask feature branch, warm-up over
100 iterations from 1% of the LR: SOLOv2's own recipe, without which its masks saturate). Each
model trains with the same backbone (the SOLO shapes config's ResNet-FPN with GroupNorm, from
scratch), the same input sizes, batch, optimiser, warm-up and constant learning rate after it (a
step schedule needs a known iteration count, which a time budget does not give). Mask R-CNN is
Detectron2's ``mask_rcnn_R_50_FPN_1x.yaml`` heads with GroupNorm in its box and mask heads (as in
Detectron2's from-scratch GN configs) on that backbone. Training stops when its training time
(evaluation excluded) reaches ``--minutes`` (``--clock cpu``: CPU time of the training process
instead of wall-clock time, for a machine shared with other jobs); COCO mask AP on ``shapes_val`` is measured after
each ``minutes / points``. Results go to ``<output>/results.json`` and a plot to ``--plot``.
"""
import argparse
import sys
import json
import logging
import time
from pathlib import Path

import torch
from detectron2.utils.events import EventStorage
from detectron2.utils.logger import setup_logger

import _setup  # noqa: E402
from _setup import REPO, load_cfg
from solo_d2.engine import Trainer

SHARED = ["MODEL.RESNETS", "MODEL.FPN", "MODEL.BACKBONE", "INPUT", "SOLVER", "DATASETS", "DATALOADER"]


def solo_cfg(path, opts):
    return load_cfg(str(REPO / path), opts)


def mask_rcnn_cfg(solo, opts):
    """Detectron2's Mask R-CNN R-50-FPN heads on the SOLO config's backbone and schedule."""
    cfg = load_cfg(model_zoo="COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    for key in SHARED:
        node, src = cfg, solo
        *parents, leaf = key.split(".")
        for p in parents:
            node, src = node[p], src[p]
        node[leaf] = src[leaf].clone()
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = solo.MODEL.PIXEL_MEAN, solo.MODEL.PIXEL_STD
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = solo.MODEL.SOLO.NUM_CLASSES
    cfg.MODEL.SOLO.NUM_CLASSES = solo.MODEL.SOLO.NUM_CLASSES
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_CONV = 4
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 1
    cfg.MODEL.ROI_BOX_HEAD.NORM = "GN"
    cfg.MODEL.ROI_MASK_HEAD.NORM = "GN"
    cfg.merge_from_list(opts)
    return cfg


def train_for(cfg, minutes, points, name, out_dir, clock=time.perf_counter):
    """Train until ``minutes`` of training time; evaluate every ``minutes / points``."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = str(out_dir / name)
    cfg.SOLVER.MAX_ITER = 10**7  # the time budget stops training
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.CHECKPOINT_PERIOD = 10**7
    cfg.TEST.EVAL_PERIOD = 0
    cfg.freeze()
    Path(cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    budget = minutes * 60.0
    marks = [budget * (k + 1) / points for k in range(points)]
    curve, trained = [], 0.0
    log = logging.getLogger("equal_time")
    with EventStorage(0) as trainer.storage:
        trainer.before_train()
        while marks:
            t0 = clock()
            trainer.before_step()
            trainer.run_step()
            trainer.after_step()
            trained += clock() - t0
            trainer.iter += 1
            if trained >= marks[0]:
                marks.pop(0)
                ap = Trainer.test(cfg, trainer.model).get("segm", {}).get("AP", float("nan"))
                # Detectron2 reports NaN when the model predicts nothing: that is an AP of 0.
                point = {"minutes": trained / 60, "iteration": trainer.iter, "mask_AP": ap}
                if ap != ap:
                    point.update(mask_AP=0.0, no_predictions=True)
                curve.append(point)
                ap = point["mask_AP"]
                log.info("%s: %.1f min, iteration %d, mask AP %.1f", name, trained / 60, trainer.iter, ap)
                trainer.model.train()
    return curve


def plot(results, path, minutes):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, curve in results.items():
        ax.plot([0] + [c["minutes"] for c in curve], [0] + [c["mask_AP"] for c in curve], marker="o", label=name)
    ax.set_xlabel("training wall-clock time on this machine (minutes)")
    ax.set_ylabel("mask AP on shapes_val")
    ax.set_title(f"Equal training time ({minutes:g} min each, from scratch)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="configs/Shapes/SOLO_R18_shapes.yaml")
    p.add_argument("--models", nargs="+", default=["SOLO", "DecoupledSOLO", "MaskRCNN"],
                   choices=["SOLO", "DecoupledSOLO", "SOLOv2", "MaskRCNN"])
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="budget in wall-clock time or in CPU time of this process (shared machine)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default="output/equal_time")
    p.add_argument("--plot", default="docs/ap_vs_time.png")
    p.add_argument("--train-json", help="train on this COCO json (registered as custom_train)")
    p.add_argument("--train-images", help="folder of --train-json's images (default: the json's folder)")
    p.add_argument("--val-json", help="evaluate on this COCO json (registered as custom_val)")
    p.add_argument("--val-images", help="folder of --val-json's images (default: the json's folder)")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args(argv)
    if args.train_json or args.val_json:
        from solo_d2.data.coco_json import register_custom_datasets

        args.opts = register_custom_datasets(
            args.train_json, args.train_images, args.val_json, args.val_images) + args.opts
    setup_logger(name="equal_time")
    setup_logger()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    out = Path(args.output)
    solo = solo_cfg(args.config_file, args.opts)
    cfgs = {
        "SOLO": solo,
        "DecoupledSOLO": solo_cfg(args.config_file, args.opts + ["MODEL.SOLO.HEAD_TYPE", "DecoupledSOLOCompactHead"]),
        "SOLOv2": solo_cfg(args.config_file, args.opts + [
            "MODEL.SOLO.HEAD_TYPE", "SOLOv2Head", "MODEL.SOLO.MASK_FEATURE_DIM", "64",
            "MODEL.SOLO.MASK_FEATURE_CHANNELS", "64", "SOLVER.WARMUP_FACTOR", "0.01",
            "SOLVER.WARMUP_ITERS", "100"]),
        "MaskRCNN": mask_rcnn_cfg(solo, args.opts),
    }
    results = {}
    for name in args.models:
        results[name] = train_for(cfgs[name], args.minutes, args.points, name, out, clock)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.plot, args.minutes)
    for name, curve in results.items():
        print(name, " ".join(f"{c['minutes']:.1f}min/it{c['iteration']}:AP{c['mask_AP']:.1f}" for c in curve))


if __name__ == "__main__":
    sys.exit(_setup.run_tool(main))  # known errors: one line, exit 2
