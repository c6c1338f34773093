#!/usr/bin/env python
"""Train and evaluate SOLO / Decoupled SOLO with Detectron2's engine.

    python train_net.py --config-file configs/COCO-InstanceSegmentation/SOLO_R50_1x.yaml --num-gpus 8
    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth
    python train_net.py --config-file CONFIG --resume          # continue from OUTPUT_DIR

On a CPU-only machine MODEL.DEVICE falls back to cpu and ``--num-gpus N`` runs N gloo processes.
"""
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, launch

import solo_d2  # noqa: F401  (registers the SOLO meta-architecture and datasets)
from solo_d2.trainer import Trainer, setup_cfg


def main(args):
    cfg = setup_cfg(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
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
