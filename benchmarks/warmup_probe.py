#!/usr/bin/env python
"""One-batch probe of how a head's mask loss reacts to the LR and warm-up, from scratch.

    python benchmarks/warmup_probe.py --head SOLOv2Head --lr 0.04 --steps 60 \\
        SOLVER.WARMUP_ITERS 100 SOLVER.WARMUP_FACTOR 0.01

Builds the tiny test config (``configs/tests/SOLO_tiny.yaml``) with ``--head`` and the given
``KEY VALUE`` options, and trains it on one fixed batch (two 128-px images with two rectangles
each) with SGD (momentum 0.9), whole-model gradient clipping at 35 and a linear warm-up from
``SOLVER.WARMUP_FACTOR`` over ``SOLVER.WARMUP_ITERS`` (0 = constant LR). Prints the losses and
the gradient norm of the mask output layer(s) every ``--every`` steps: a mask loss that stops
moving with a zero gradient means every mask saturated (docs/benchmarks/equal_time.md).
"""
import argparse
import sys

import _setup  # noqa: F401  (the checkout's solo_d2 and tools/ first on sys.path)
import torch
from _setup import REPO

sys.path.insert(0, str(REPO / "tests"))
from helpers import instances, tiny_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head", default="SOLOv2Head")
    p.add_argument("--lr", type=float, default=0.04)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=15)
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = tiny_cfg(args.head)
    cfg.merge_from_list(args.opts)
    model = build_model(cfg)
    model.train()
    batch = [{"image": torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8),
              "instances": instances(128, 128, [(10, 20, 90, 110, 1), (60, 60, 100, 80, 2)])}
             for _ in range(2)]
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    warm, factor = int(cfg.SOLVER.WARMUP_ITERS), float(cfg.SOLVER.WARMUP_FACTOR)
    for it in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * (factor + (1 - factor) * min(it / warm, 1.0) if warm else 1.0)
        losses = model(batch)
        opt.zero_grad()
        sum(losses.values()).backward()
        if it % args.every == 0:
            grads = [q.grad for q in model.head.mask_output_parameters() if q.grad is not None]
            norm = torch.cat([g.flatten() for g in grads]).norm().item() if grads else 0.0
            print(it, {k: round(v.item(), 4) for k, v in losses.items()}, f"mask output grad {norm:.3g}")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 35.0)
        opt.step()


if __name__ == "__main__":
    main()
