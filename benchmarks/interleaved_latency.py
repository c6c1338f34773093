#!/usr/bin/env python
"""Inference time per stage of several variants, interleaved in one process, so that ratios hold
on a machine whose load changes (a shared CPU): each round runs every variant once, in turn.

    python tools/interleaved_latency.py --variants SOLO:float32 SOLO:bfloat16 --runs 5 --threads 1
    python tools/interleaved_latency.py --variants SOLO:float32 MaskRCNN:float32 --runs 5 --threads 1

A variant is ``MODEL:DTYPE`` (models of ``tools/benchmark.py``; DTYPE is SOLO's
``MODEL.SOLO.INFERENCE_DTYPE``, Mask R-CNN's autocast dtype; float16 on CUDA only; variants of
one model share its weights). ``--device cuda`` runs them on the GPU (timings synchronised);
``--batch N`` times batches of N copies of the image. The set-up is
``tools/benchmark.py``'s (random weights, calibrated FrozenBN, forced candidates, ``--masks``);
``--size`` (default: the first model's reference size) is used for every variant. Prints, per
variant, the median (and min) per stage over ``--runs`` rounds after one warm-up round, and the
ratio of each variant's median total (and of the per-round totals' median ratio) to the first's.
"""
import argparse
import statistics

import _common  # noqa: F401  (the checkout's solo_d2 first on sys.path)
import torch

from _common import calibrate_frozen_bn, force_candidates, is_solo
from benchmark import MODELS, Timer, build, infer_stages


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", required=True)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", nargs=2, type=int, default=None, metavar=("H", "W"))
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--masks", default="random", choices=["random", "objects"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    variants = [tuple(v.split(":")) for v in a.variants]
    h, w = a.size or MODELS[variants[0][0]][1]
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0)).to(a.device)
    models = {}
    for name, _ in variants:
        if name not in models:
            model = build(name, a.device).eval()
            calibrate_frozen_bn(model, image)
            force_candidates(model, image, a.candidates if is_solo(model) else None,
                             object_masks=a.masks == "objects")
            models[name] = model
    batch = [{"image": image}] * a.batch
    times = {v: [] for v in variants}
    outputs = {}
    for round_ in range(a.runs + 1):
        for v in variants:
            model = models[v[0]]
            if is_solo(model):
                model.inference_dtype = v[1]
            t = Timer(a.device)
            with torch.inference_mode():
                outputs[v] = infer_stages(model, batch, t, v[1])
            if round_:
                times[v].append(t.times)
    first = variants[0]
    print(f"{h}x{w}, batch {a.batch}, {a.device}, threads {a.threads}, {a.runs} rounds after one warm-up, candidates {a.candidates} "
          f"({a.masks} masks)")
    for v in variants:
        stages = {k: [r[k] for r in times[v]] for k in times[v][0]}
        totals = [sum(r.values()) for r in times[v]]
        ratio = statistics.median(totals) / statistics.median([sum(r.values()) for r in times[first]])
        per_round = statistics.median(
            sum(r.values()) / sum(f.values()) for r, f in zip(times[v], times[first]))
        post = statistics.median(stages["postprocess"]) / statistics.median(totals)
        print(f"{v[0]:20s} {v[1]:9s} total median {1000 * statistics.median(totals):8.0f} ms "
              f"(min {1000 * min(totals):.0f})  "
              + "  ".join(f"{k} {1000 * statistics.median(x):.0f}" for k, x in stages.items())
              + f"  postprocess share {100 * post:.1f}%  outputs {outputs[v]}"
              + f"  vs {first[0]}:{first[1]}: {ratio:.2f}x (per-round median {per_round:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
