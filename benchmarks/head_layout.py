#!/usr/bin/env python
"""Does the SOLO head (GroupNorm towers) run faster in channels-last memory format? Times the
head's forward on one model's calibrated random-weight features, in turn: standard layout,
channels-last (features and weights) and channels-last features only; float32 and bfloat16
(``MODEL.SOLO.INFERENCE_DTYPE``'s autocast).

    python tools/head_layout.py --model SOLO --runs 3 --threads 1
    python tools/head_layout.py --model SOLO --runs 5 --threads 1 --pipeline

``--pipeline``: whole inferences instead (``tools/benchmark.py``'s set-up: 500 forced candidates,
object-like masks), the head in the standard layout (the backbone's features made contiguous
first) and channels-last (``MODEL.SOLO.CHANNELS_LAST``'s path), in turn, per stage.
"""
import argparse
import statistics
import time

import _common  # noqa: F401  (the checkout's solo_d2 first on sys.path)
import torch


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
    from benchmark import MODELS, build

    from _common import calibrate_frozen_bn

    model = build(a.model, a.device).eval()
    h, w = MODELS[a.model][1]
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, device=a.device)
    calibrate_frozen_bn(model, image)
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
    from benchmark import MODELS, Timer, build, infer_stages

    from _common import calibrate_frozen_bn, force_candidates

    model = build(a.model, a.device).eval()
    if not model.channels_last:
        raise SystemExit(f"--pipeline: {a.model}'s config has MODEL.SOLO.CHANNELS_LAST False")
    h, w = MODELS[a.model][1]
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    calibrate_frozen_bn(model, image)
    force_candidates(model, image, 500, object_masks=True)
    channels_last_backbone = model.run_backbone

    def standard_backbone(x):
        return {k: v.contiguous() for k, v in channels_last_backbone(x).items()}

    times = {}
    for round_ in range(a.runs + 1):  # the first round is a warm-up
        for variant in ("standard head", "channels-last head"):
            cl = variant.startswith("channels-last")
            model.head.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            model.run_backbone = channels_last_backbone if cl else standard_backbone
            t = Timer(a.device)
            with torch.inference_mode():
                infer_stages(model, [{"image": image}], t)
            if round_:
                times.setdefault(variant, []).append(t.times)
    for variant, ts in times.items():
        def med(key):
            return statistics.median(x[key] * 1000 for x in ts)

        total = statistics.median(sum(x.values()) * 1000 for x in ts)
        print(f"{a.model} {h}x{w} float32 inference, {variant}: median total {total:.0f} ms, "
              f"backbone {med('backbone'):.0f}, heads {med('heads'):.0f}, postprocess "
              f"{med('postprocess'):.0f} (n={len(ts)}, interleaved), threads {a.threads}", flush=True)


if __name__ == "__main__":
    main()
