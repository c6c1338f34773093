#!/usr/bin/env python
"""Where one image's post-processing spends its time: the model's head outputs are computed once,
then ``SOLO.inference_from_outputs`` is timed (``--runs`` calls) and profiled (one call, PyTorch's
profiler, operators by self time).

    python benchmarks/profile_postprocess.py --model SOLO --threads 1
    python benchmarks/profile_postprocess.py --model SOLOv2 --candidates 2000 --threads 1

The set-up is ``tools/benchmark.py``'s: random weights, calibrated FrozenBN, ``--candidates``
forced (cell, class) pairs, object-like candidate masks (``--masks objects``, the default here).
"""
import argparse
import statistics
import time

import _setup  # noqa: F401  (the checkout's solo_d2 and tools/ first on sys.path)
import torch

from _setup import MODELS, bench_image, is_solo, prepared_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SOLO")
    p.add_argument("--size", nargs=2, type=int, default=None, metavar=("H", "W"))
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--masks", default="objects", choices=["random", "objects"])
    p.add_argument("--runs", type=int, default=3, help="timed calls after one warm-up")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=15, help="operators to list")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from torch.profiler import ProfilerActivity, profile

    h, w = a.size or MODELS[a.model][1]
    image = bench_image(h, w)
    model = prepared_model(a.model, image, candidates=a.candidates, masks=a.masks)
    if not is_solo(model):
        raise SystemExit(f"--model {a.model}: not a SOLO model")
    batch = [{"image": image}]
    with torch.inference_mode():
        images = model.preprocess_image(batch)
        feats = model.run_backbone(images.tensor)
        cate, mask_feats = model.float_outputs(*model.head([feats[f] for f in model.in_features]))

        def post():
            return model.inference_from_outputs(cate, mask_feats, images, batch)

        outputs = len(post()[0]["instances"])  # warm-up
        times = []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            post()
            times.append((time.perf_counter() - t0) * 1000)
        print(f"{a.model} {h}x{w}, {a.candidates} candidates ({a.masks} masks), threads {a.threads}: "
              f"postprocess median {statistics.median(times):.0f} ms (min {min(times):.0f}, "
              f"n={len(times)}), {outputs} outputs", flush=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            post()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
