#!/usr/bin/env python
"""Inference time per stage of several variants, interleaved in one process, so that ratios hold
on a machine whose load changes (a shared CPU): each round runs every variant once, in turn.

    python benchmarks/interleaved_latency.py --variants SOLO:float32 SOLO:bfloat16 --runs 5 --threads 1
    python benchmarks/interleaved_latency.py --variants SOLO:float32 MaskRCNN:float32 --runs 5 --threads 1

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

import _setup  # noqa: F401  (the checkout's solo_d2 and tools/ first on sys.path)
import torch

from _setup import MODELS, Timer, bench_image, infer_stages, is_solo, prepared_model


def time_rounds(variants, runs, device="cpu"):
    """Interleaved timing: ``variants`` maps a label to ``run(timer)``, one inference timed per
    stage with ``timer`` (a :class:`Timer`), returning its number of output instances. Each of
    ``runs + 1`` rounds runs every variant once, in turn; the first round is a warm-up. Returns
    (label -> the per-round stage times, label -> the last output count)."""
    times = {label: [] for label in variants}
    outputs = {}
    for round_ in range(runs + 1):
        for label, run in variants.items():
            t = Timer(device)
            with torch.inference_mode():
                outputs[label] = run(t)
            if round_:
                times[label].append(t.times)
    return times, outputs


def print_summary(times, outputs):
    """Per variant: median (and min) total and per-stage times, the postprocess share, and the
    ratio of its median total (and the per-round totals' median ratio) to the first variant's."""
    first = next(iter(times))
    first_totals = [sum(r.values()) for r in times[first]]
    width = max(len(label) for label in times)
    for label, rounds in times.items():
        stages = {k: [r[k] for r in rounds] for k in rounds[0]}
        totals = [sum(r.values()) for r in rounds]
        ratio = statistics.median(totals) / statistics.median(first_totals)
        per_round = statistics.median(t / f for t, f in zip(totals, first_totals))
        post = statistics.median(stages["postprocess"]) / statistics.median(totals)
        print(f"{label:{width}s}  total median {1000 * statistics.median(totals):8.0f} ms "
              f"(min {1000 * min(totals):.0f})  "
              + "  ".join(f"{k} {1000 * statistics.median(x):.0f}" for k, x in stages.items())
              + f"  postprocess share {100 * post:.1f}%  outputs {outputs[label]}"
              + f"  vs {first}: {ratio:.2f}x (per-round median {per_round:.2f}x)", flush=True)


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
    image = bench_image(h, w, a.device)
    models = {}
    for name, _ in variants:
        if name not in models:
            models[name] = prepared_model(name, image, a.device, a.candidates, a.masks)
    batch = [{"image": image}] * a.batch

    def runner(name, dtype):
        model = models[name]

        def run(t):
            if is_solo(model):
                model.inference_dtype = dtype
            return infer_stages(model, batch, t, dtype)

        return run

    times, outputs = time_rounds({f"{n} {d}": runner(n, d) for n, d in variants}, a.runs, a.device)
    print(f"{h}x{w}, batch {a.batch}, {a.device}, threads {a.threads}, {a.runs} rounds after one warm-up, "
          f"candidates {a.candidates} ({a.masks} masks)")
    print_summary(times, outputs)


if __name__ == "__main__":
    main()
