#!/usr/bin/env python
"""Time of pasting SOLO's soft masks: the full-image paste against the box-limited one
(``solo_d2.modeling.mask_paste``), on synthetic object-like masks, and whether they agree.

    python benchmarks/paste_time.py --masks 100 --runs 5 --threads 1

Masks of 200x336 (SOLO's finest mask size at 800x1333, padded 800x1344): faint noise (< 0.3)
plus one soft-edged square each, sides spread log-uniformly from 4 to 120 mask pixels (16 to 480
input pixels), at seeded positions, some at the border. Output at the image size (800x1333) and
at another size (480x800, as for an image resized for the model).
"""
import argparse
import statistics
import time

import _setup  # noqa: F401  (the checkout's solo_d2 and tools/ first on sys.path)
import torch

from solo_d2.modeling.mask_paste import paste_masks_full, paste_masks_in_boxes


def masks(n, h=200, w=336, seed=0):
    g = torch.Generator().manual_seed(seed)
    soft = torch.rand(n, h, w, generator=g) * 0.3
    ys, xs = torch.arange(h).float(), torch.arange(w).float()
    for k in range(n):
        side = 4 * 30 ** float(torch.rand(1, generator=g))
        cy, cx = float(torch.rand(1, generator=g)) * h, float(torch.rand(1, generator=g)) * w
        ay = torch.sigmoid((side / 2 - (ys - cy).abs()) / 1.5)
        ax = torch.sigmoid((side / 2 - (xs - cx).abs()) / 1.5)
        soft[k] = torch.maximum(soft[k], ay[:, None] * ax[None, :])
    return soft


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--masks", type=int, default=100)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    soft = masks(a.masks)
    for out in ((800, 1333), (480, 800)):
        times = {}
        results = {}
        for _ in range(a.runs + 1):  # interleaved; the first round is a warm-up
            for f in (paste_masks_full, paste_masks_in_boxes):
                t0 = time.perf_counter()
                results[f.__name__] = f(soft, (800, 1344), (800, 1333), out, 0.5)
                times.setdefault(f.__name__, []).append(time.perf_counter() - t0)
        same = torch.equal(results["paste_masks_full"], results["paste_masks_in_boxes"])
        full = statistics.median(times["paste_masks_full"][1:])
        for name, ts in times.items():
            ts = ts[1:]
            print(f"{a.masks} masks -> {out[0]}x{out[1]}: {name} median {1000 * statistics.median(ts):.0f} ms "
                  f"(min {1000 * min(ts):.0f}), {statistics.median(ts) / full:.2f}x the full paste; "
                  f"same masks: {same}; threads {a.threads}", flush=True)


if __name__ == "__main__":
    main()
