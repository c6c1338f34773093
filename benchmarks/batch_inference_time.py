#!/usr/bin/env python
"""Time of inference on one batch of images of different sizes: SOLO's batch-independent
inference (images grouped by size, each group on its own canvas) against one joint pass on the
batch's padded canvas (what ``SOLO`` did before; its results depend on the batch).

    python benchmarks/batch_inference_time.py --config-file configs/Shapes/DecoupledSOLO_R18_shapes.yaml \\
        --sizes 256x256 256x192 192x256 224x224 [KEY VALUE ...]

Random weights (``MODEL.WEIGHTS`` is ignored), thresholds as in the config unless overridden;
prints the median and range of ``--repeats`` timed runs after ``--warmup`` runs, for each mode,
alternating the modes, and how many instances each mode returned per image.
"""
import statistics
import sys
import time

import numpy as np
import torch
import _setup  # noqa: E402
from _setup import config_parser, load_cfg


def joint_inference(model, batched_inputs):
    """The former ``SOLO.forward`` in eval mode: one pass on the batch's padded canvas."""
    images = model.preprocess_image(batched_inputs)
    features = model.run_backbone(images.tensor)
    cate_logits, mask_feats = model.head([features[f] for f in model.in_features])
    return model.inference_from_outputs(cate_logits, mask_feats, images, batched_inputs)


def main(argv=None):
    p = config_parser(__doc__)
    p.add_argument("--sizes", nargs="+", default=["256x256", "256x192", "192x256", "224x224"],
                   help="HxW of each image of the batch")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)

    from solo_d2.engine import Trainer

    torch.set_num_threads(args.threads)
    cfg = load_cfg(args.config_file, args.opts, device="cpu")
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).eval()
    rng = np.random.default_rng(0)
    inputs = []
    for s in args.sizes:
        h, w = (int(v) for v in s.split("x"))
        img = torch.as_tensor(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        inputs.append({"image": img, "height": h, "width": w})
    modes = {"joint (one padded canvas)": lambda: joint_inference(model, inputs),
             "grouped by size (SOLO.inference)": lambda: model(inputs)}
    times = {m: [] for m in modes}
    counts = {}
    with torch.no_grad():
        for i in range(args.warmup + args.repeats):
            for name, fn in modes.items():
                start = time.perf_counter()
                out = fn()
                elapsed = time.perf_counter() - start
                if i >= args.warmup:
                    times[name].append(elapsed * 1000)
                counts[name] = [len(o["instances"]) for o in out]
    print(f"batch {args.sizes}, {args.threads} threads, {args.repeats} runs; {args.config_file}")
    for name, t in times.items():
        print(f"{name}: median {statistics.median(t):.0f} ms (min {min(t):.0f}, max {max(t):.0f}); "
              f"instances per image {counts[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(_setup.run_tool(main))  # known errors: one line, exit 2
