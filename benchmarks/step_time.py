#!/usr/bin/env python
"""Time of one training step of a config on this machine, on real batches of its training set.

    python benchmarks/step_time.py --config-file configs/Shapes/DecoupledSOLO_R18_shapes.yaml [KEY VALUE ...]

A step is the trainer's own: the inner loop that :meth:`solo_d2.engine.Trainer.build_train_loop`
builds for the config (float32, or autocast when ``SOLVER.AMP.ENABLED``) runs its ``run_step``:
forward and losses, backward, the finite-loss check and metric writing, and the optimizer step
(the config's optimizer, with its gradient clipping). Batches are loaded before timing
(``DATALOADER.NUM_WORKERS 0``), so the figure excludes data loading; the trainer's "time" in its
log includes it. Prints the median and range over ``--steps`` steps after ``--warmup`` steps.
"""
import logging
import statistics
import sys

import torch

import _setup  # noqa: E402
from _setup import config_parser, load_cfg


def main(argv=None):
    p = config_parser(__doc__)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)

    from detectron2.data import build_detection_train_loader

    from solo_d2.engine import Trainer, amp_precision
    from solo_d2.engine.time_budget import time_steps

    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    cfg = load_cfg(args.config_file, args.opts + ["DATALOADER.NUM_WORKERS", "0"])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    model.train()
    optimizer = Trainer.build_optimizer(cfg, model)
    loader = iter(build_detection_train_loader(cfg))
    batches = [next(loader) for _ in range(args.warmup + args.steps)]
    loop = Trainer.build_train_loop(cfg, model, batches, optimizer)
    precision = str(amp_precision(cfg)).replace("torch.", "") if cfg.SOLVER.AMP.ENABLED else "float32"
    times = time_steps(loop, len(batches), cfg.MODEL.DEVICE)
    t = [x * 1000 for x in times[args.warmup :]]
    print(
        f"{args.config_file} {' '.join(args.opts)}: {precision}, batch {cfg.SOLVER.IMS_PER_BATCH}, "
        f"{args.threads} threads: step {statistics.median(t):.0f} ms median "
        f"({min(t):.0f}-{max(t):.0f}) over {len(t)} steps"
    )


if __name__ == "__main__":
    sys.exit(_setup.run_tool(main))  # known errors: one line, exit 2
