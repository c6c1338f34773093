#!/usr/bin/env python
"""Does the SOLO head (GroupNorm towers) run faster in channels-last memory format? Times the
head's forward on one model's calibrated random-weight features, in turn: standard layout,
channels-last (features and weights) and channels-last features only; float32 and bfloat16
(``MODEL.SOLO.INFERENCE_DTYPE``'s autocast).

    python benchmarks/head_layout.py --model SOLO --runs 3 --threads 1
    python benchmarks/head_layout.py --model SOLO --runs 5 --threads 1 --pipeline

``--pipeline``: whole inferences instead (``tools/benchmark.py``'s set-up: 500 forced candidates,
object-like masks), the head in the standard layout (the backbone's features made contiguous
first) and channels-last (``MODEL.SOLO.CHANNELS_LAST``'s path), interleaved and summarised per
stage as by ``benchmarks/interleaved_latency.py``.
"""
import argparse
import statistics
import time

import _setup  # noqa: F401  (the checkout's solo_d2 and tools/ first on sys.path)
import torch

from _setup import MODELS, bench_image, infer_stages, prepared_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SOLO")
    p.add_argument("--runs", type=int, default=3, help="timed runs per layout (alternating)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--pipeline", action="store_true", help="time whole inferences per stage")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.pipeline:
        return pipeline(a)
    h, w = MODELS[a.model][1]
    image = bench_image(h, w, a.device)
    model = prepared_model(a.model, image, a.device, force=False)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        images = model.preprocess_image([{"image": image}])
        f = model.run_backbone(images.tensor)
        feats = [f[k] for k in model.in_features]
        for dtype in ("float32", "bfloat16"):
            model.inference_dtype = dtype
            times = {}
            # standard layout; channels-last features and weights; channels-last features only
            for cl in ("standard", "channels-last", "channels-last input") * (a.runs + 1):
                fmt = torch.contiguous_format if cl == "standard" else torch.channels_last
                model.head.to(memory_format=torch.channels_last if cl == "channels-last" else torch.contiguous_format)
                x = [t.contiguous(memory_format=fmt) for t in feats]
                with model.inference_autocast():
                    sync()
                    t0 = time.perf_counter()
                    model.head(x)
                    sync()
                times.setdefault(cl, []).append(time.perf_counter() - t0)
            for cl, ts in times.items():
                ts = [t * 1000 for t in ts[1:]]  # the first round is a warm-up
                print(f"{a.model} {h}x{w} {dtype} head, {cl}: "
                      f"median {statistics.median(ts):.0f} ms (min {min(ts):.0f}, max {max(ts):.0f}, "
                      f"n={len(ts)}), threads {a.threads}", flush=True)


def pipeline(a):
    from interleaved_latency import print_summary, time_rounds

    h, w = MODELS[a.model][1]
    image = bench_image(h, w, a.device)
    model = prepared_model(a.model, image, a.device, candidates=500, masks="objects")
    if not model.channels_last:
        raise SystemExit(f"--pipeline: {a.model}'s config has MODEL.SOLO.CHANNELS_LAST False")
    channels_last_backbone = model.run_backbone

    def standard_backbone(x):
        return {k: v.contiguous() for k, v in channels_last_backbone(x).items()}

    def runner(cl):
        def run(t):
            model.head.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            model.run_backbone = channels_last_backbone if cl else standard_backbone
            return infer_stages(model, [{"image": image}], t)

        return run

    times, outputs = time_rounds({"standard head": runner(False), "channels-last head": runner(True)},
                                 a.runs, a.device)
    print(f"{a.model} {h}x{w} float32 inference, {a.device}, threads {a.threads}, {a.runs} rounds after one "
          f"warm-up, 500 candidates (objects masks)")
    print_summary(times, outputs)


if __name__ == "__main__":
    main()
