#!/usr/bin/env python
"""Time of one training step of a config on this machine, on real batches of its training set.

    python tools/step_time.py --config-file configs/Shapes/DecoupledSOLO_R18_shapes.yaml [KEY VALUE ...]

A step is what the trainer does per iteration minus data loading: forward and losses (under
autocast when ``SOLVER.AMP.ENABLED``, as :func:`solo_d2.trainer.build_train_loop` runs it),
backward and the optimizer step (the config's optimizer, with its gradient clipping). Batches are
loaded before timing (``DATALOADER.NUM_WORKERS 0``), so the figure excludes data loading; the
trainer's "time" in its log includes it. Prints the median and range over ``--steps`` steps after
``--warmup`` steps.
"""
import argparse
import contextlib
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = p.parse_args(argv)

    from detectron2.config import get_cfg
    from detectron2.data import build_detection_train_loader

    from solo_d2 import add_solo_config
    from solo_d2.trainer import Trainer

    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    cfg = get_cfg()
    add_solo_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts + ["DATALOADER.NUM_WORKERS", "0"])
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    model.train()
    optimizer = Trainer.build_optimizer(cfg, model)
    loader = iter(build_detection_train_loader(cfg))
    batches = [next(loader) for _ in range(args.warmup + args.steps)]
    amp = cfg.SOLVER.AMP.ENABLED
    device = torch.device(cfg.MODEL.DEVICE).type
    precision = "float32"
    autocast = contextlib.nullcontext
    if amp:
        from solo_d2.trainer import amp_precision

        dtype = amp_precision(cfg)
        precision = str(dtype).replace("torch.", "")
        autocast = lambda: torch.autocast(device, dtype=dtype)  # noqa: E731
    times = []
    for batch in batches:
        start = time.perf_counter()
        with autocast():
            losses = sum(model(batch).values())
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    t = [x * 1000 for x in times[args.warmup :]]
    print(
        f"{args.config_file} {' '.join(args.opts)}: {precision}, batch {cfg.SOLVER.IMS_PER_BATCH}, "
        f"{args.threads} threads: step {statistics.median(t):.0f} ms median "
        f"({min(t):.0f}-{max(t):.0f}) over {len(t)} steps"
    )


if __name__ == "__main__":
    main()
