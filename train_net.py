#!/usr/bin/env python
"""Train and evaluate SOLO / Decoupled SOLO with Detectron2's engine.

    python train_net.py --config-file configs/COCO-InstanceSegmentation/SOLO_R50_1x.yaml --num-gpus 8
    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth
    python train_net.py --config-file CONFIG --resume          # continue from OUTPUT_DIR

Your own COCO-format dataset (checked up front, registered as ``custom_train`` / ``custom_val``;
DATASETS.TRAIN / TEST and MODEL.SOLO.NUM_CLASSES are set from it):

    python train_net.py --config-file configs/Shapes/SOLO_R18_shapes.yaml \\
        --train-json train.json --train-images images/ --val-json val.json --val-images images/

On a CPU-only machine MODEL.DEVICE falls back to cpu and ``--num-gpus N`` runs N gloo processes.
Errors naming a file, key or value (a bad dataset, a config typo, no dataset to train or
evaluate on) are printed without their traceback, exit status 2 (``--debug`` or
``SOLO_D2_DEBUG=1``: with it).
"""
import os
import sys

from detectron2.engine import default_argument_parser, launch

import solo_d2  # noqa: F401  (registers the SOLO meta-architecture and datasets)
from solo_d2.checkpoint import PARTIAL_WEIGHTS_ENV, UNSAFE_LOAD_ENV, SafeDetectionCheckpointer
from solo_d2.data.coco_json import register_custom_datasets
from solo_d2.engine import Trainer, setup_cfg
from solo_d2.engine.output_lock import output_dir_lock
from solo_d2.utils.cli import UserError, add_debug_flag, run_main


def argument_parser():
    parser = default_argument_parser()
    group = parser.add_argument_group(
        "custom dataset",
        "a COCO-format instance-segmentation dataset; registered as custom_train / custom_val, "
        "which become DATASETS.TRAIN / DATASETS.TEST; MODEL.SOLO.NUM_CLASSES is set from the "
        "json's categories (options given after them on the command line still win)",
    )
    group.add_argument("--train-json", metavar="FILE", help="COCO json of the training set")
    group.add_argument("--train-images", metavar="DIR",
                       help="folder of the training images (default: the json's folder)")
    group.add_argument("--val-json", metavar="FILE", help="COCO json of the validation set")
    group.add_argument("--val-images", metavar="DIR",
                       help="folder of the validation images (default: the json's folder)")
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="allow checkpoints (MODEL.WEIGHTS, --resume) that need arbitrary unpickling, which can "
        "run code: only for files you trust (default: weights-only loading; such files are refused)",
    )
    parser.add_argument(
        "--allow-partial-weights",
        action="store_true",
        help="with --eval-only: evaluate even when MODEL.WEIGHTS does not fit the model's head "
        "(missing / other-shape head parameters, no key of the model, or empty: random weights); "
        "default: such weights are an error naming the keys",
    )
    add_debug_flag(parser)
    return parser


def _checked_cfg(args, extra_opts):
    """The cfg of this run before setup_cfg writes into its OUTPUT_DIR; raises
    :class:`UserError` when there is no dataset to train or evaluate on."""
    cfg = solo_d2.get_solo_cfg(args.config_file, list(extra_opts) + list(args.opts))
    if args.eval_only and not len(cfg.DATASETS.TEST):
        raise UserError("--eval-only: DATASETS.TEST is empty, nothing to evaluate on; give "
                        "--val-json FILE (a COCO json) or set DATASETS.TEST, e.g. "
                        "DATASETS.TEST \"('shapes_val',)\"")
    if not args.eval_only and not len(cfg.DATASETS.TRAIN):
        raise UserError("DATASETS.TRAIN is empty, nothing to train on; give --train-json FILE "
                        "(a COCO json) or set DATASETS.TRAIN, e.g. DATASETS.TRAIN \"('shapes_train',)\"")
    return cfg


def main(args):
    # Registration happens here, in every process that launch() starts.
    custom_opts = register_custom_datasets(
        train_json=getattr(args, "train_json", None),
        train_images=getattr(args, "train_images", None),
        val_json=getattr(args, "val_json", None),
        val_images=getattr(args, "val_images", None),
    )
    # One live run per OUTPUT_DIR (rank 0 holds a lock file; solo_d2/engine/output_lock.py).
    what = "an --eval-only evaluation" if args.eval_only else "a training run"
    with output_dir_lock(_checked_cfg(args, custom_opts).OUTPUT_DIR, what):
        return _run(args, custom_opts)


def _run(args, custom_opts):
    cfg = setup_cfg(args, extra_opts=custom_opts)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    """The command line; known errors are printed in one line (exit 2), see the module docs."""
    sys.exit(run_main(_invoke_main, prog="train_net.py"))


def _invoke_main() -> None:
    parser = argument_parser()
    args = parser.parse_args()
    for kind in ("train", "val"):
        if getattr(args, f"{kind}_images") and not getattr(args, f"{kind}_json"):
            parser.error(f"--{kind}-images needs --{kind}-json")
    if args.unsafe_load:
        os.environ[UNSAFE_LOAD_ENV] = "1"  # inherited by the processes that launch() starts
    if args.allow_partial_weights:
        os.environ[PARTIAL_WEIGHTS_ENV] = "1"
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
