#!/usr/bin/env python
"""Speed and peak memory of one training step and of inference, per model, on one input size.

    python tools/benchmark.py                                   # the default table (CPU)
    python tools/benchmark.py --models SOLO DecoupledSOLO --size 800 1333 --runs 5
    python tools/benchmark.py --device cuda --runs 10           # on a GPU

Every (model, mode) pair runs in a fresh subprocess, so peak memory belongs to that pair alone:

- CPU: peak resident memory of the process (``ru_maxrss``) and its rise above the resident
  memory before the first step (model, weights and input already in memory);
- CUDA: ``torch.cuda.max_memory_allocated`` (and the rise above the allocation before the step).

Times are the median (and min/max) of ``--runs`` runs after one warm-up run; inference runs under
``torch.inference_mode``. Weights are random, so inference would find no candidate at the prior
probability; the benchmark sets the category bias to 0 and re-draws the mask output weights so
that every cell surviving point NMS is a candidate: ``NMS_PRE`` (500) candidate masks enter
mask formation, area filter, maskness and Matrix NMS, and ``MAX_PER_IMAGE`` (100) masks are
pasted at full resolution: the heaviest postprocess the config allows.

Training uses ``--instances`` (default 10) GT rectangles of sizes spread over every level.
``SOLO_S2`` is vanilla SOLO forming all S^2 masks of every level in training, as reference
implementations do; solo_d2's own ``SOLO`` forms only the positive cells' masks.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "SOLO": ("configs/COCO-InstanceSegmentation/SOLO_R50_1x.yaml", (800, 1333)),
    "SOLO_S2": ("configs/COCO-InstanceSegmentation/SOLO_R50_1x.yaml", (800, 1333)),
    "DecoupledSOLO": ("configs/COCO-InstanceSegmentation/DecoupledSOLO_R50_1x.yaml", (800, 1333)),
    "DecoupledSOLO_Light": (
        "configs/COCO-InstanceSegmentation/DecoupledSOLO_Light_R50_3x.yaml",
        (512, 852),
    ),
}


def _build(name, device):
    import torch
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import solo_d2

    cfg = get_cfg()
    solo_d2.add_solo_config(cfg)
    cfg.merge_from_file(str(REPO / MODELS[name][0]))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    torch.manual_seed(0)
    model = build_model(cfg)
    if name == "SOLO_S2":
        head = model.head

        def mask_probs_via_all_s2(mask_feat, level, img_idx, cell_idx):
            return head.full_mask_probs(mask_feat, level)[img_idx, cell_idx]

        head.mask_probs = mask_probs_via_all_s2
    return model


def _gt(h, w, n, device):
    import torch
    from detectron2.structures import BitMasks, Instances

    g = torch.Generator().manual_seed(0)
    inst = Instances((h, w))
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        # sizes from ~20 px to ~0.8 * min(h, w), log-spaced: every level gets objects
        size = int(20 * (0.8 * min(h, w) / 20) ** (i / max(n - 1, 1)))
        y0 = int(torch.randint(0, h - size + 1, (1,), generator=g))
        x0 = int(torch.randint(0, w - size + 1, (1,), generator=g))
        masks[i, y0 : y0 + size, x0 : x0 + size] = True
    inst.gt_masks = BitMasks(masks)
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
    inst.gt_classes = torch.arange(n) % 80
    return inst.to(device)


def _force_candidates(model):
    """Random weights -> realistic postprocess load (see the module docstring)."""
    import torch

    with torch.no_grad():
        model.head.cate_pred.bias.zero_()
        g = torch.Generator().manual_seed(1)
        for p in model.head.mask_output_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            else:
                p.zero_()


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args):
    import torch

    torch.set_num_threads(args.threads)
    device = args.device
    model = _build(args.model, device)
    h, w = args.size
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, device=device)
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if args.mode == "train":
        model.train()
        batch = [{"image": image, "instances": _gt(h, w, args.instances, device)}]

        def step():
            model.zero_grad(set_to_none=True)
            losses = model(batch)
            sum(losses.values()).backward()

    else:
        model.eval()
        _force_candidates(model)
        batch = [{"image": image}]

        def step():
            with torch.inference_mode():
                return model(batch)[0]["instances"]

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mb()
    times, outputs = [], None
    for i in range(args.runs + 1):
        sync()
        t0 = time.perf_counter()
        out = step()
        sync()
        if i > 0:
            times.append(time.perf_counter() - t0)
        if args.mode == "infer":
            outputs = len(out)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "model": args.model,
                "mode": args.mode,
                "size": [h, w],
                "device": device,
                "threads": args.threads,
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "runs": len(times),
                "mem_before_mb": round(before, 1),
                "peak_mb": round(peak, 1),
                "peak_rise_mb": round(peak - before, 1),
                "outputs": outputs,
            }
        )
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    p.add_argument("--size", nargs=2, type=int, default=None, help="H W (default: each model's reference size)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--instances", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        args.size = args.size or MODELS[args.model][1]
        return worker(args)

    results = []
    for model in args.models:
        for mode in args.modes:
            size = args.size or MODELS[model][1]
            cmd = [
                sys.executable, __file__, "--_worker", "--model", model, "--mode", mode,
                "--size", str(size[0]), str(size[1]), "--runs", str(args.runs),
                "--threads", str(args.threads), "--instances", str(args.instances),
                "--device", args.device,
            ]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"benchmark of {model} ({mode}) failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            print(
                f"{model:22s} {mode:5s} {r['size'][0]}x{r['size'][1]}  median {r['median_s'] * 1000:9.1f} ms "
                f"(min {r['min_s'] * 1000:.1f}, max {r['max_s'] * 1000:.1f}, n={r['runs']})  "
                f"peak {r['peak_mb']:8.1f} MB  rise {r['peak_rise_mb']:8.1f} MB",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
