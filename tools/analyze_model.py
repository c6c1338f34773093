#!/usr/bin/env python
"""FLOPs and parameters of a solo_d2 (or any Detectron2) config, the way Detectron2's
``tools/analyze_model.py`` counts them, but with solo_d2's config keys so SOLO configs load.

    python tools/analyze_model.py --config-file configs/COCO-InstanceSegmentation/SOLO_R50_1x.yaml
    python tools/analyze_model.py --model-zoo COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml
    python tools/analyze_model.py --config-file CONFIG --tasks parameter

FLOPs are counted by fvcore's tracer (Detectron2's ``FlopCountAnalysis``: one multiply-add = one
flop) on inference, averaged over ``--num-inputs`` random images of ``--size`` (default: the
config's test size, 800x1333 for most), with the same realistic-candidate set-up as
``tools/benchmark.py`` (calibrated FrozenBN statistics, ``--candidates`` forced, default 500), split into
backbone (+FPN), heads and the rest (postprocess and glue). Parameters come from fvcore's
``parameter_count_table``.
"""
import argparse
import sys
import json
import logging
from collections import defaultdict
from pathlib import Path

import torch

import _common  # noqa: E402
from _common import calibrate_frozen_bn, force_candidates, is_solo, load_cfg


def build(args):
    from detectron2.modeling import build_model

    cfg = load_cfg(args.config_file, args.opts, model_zoo=args.model_zoo, device="cpu")
    cfg.MODEL.WEIGHTS = ""
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def count_flops(model, images):
    """Average flops (in GFLOP) per stage over ``images`` (list of (3, H, W) uint8 tensors)."""
    from detectron2.utils.analysis import FlopCountAnalysis

    per_stage = defaultdict(float)
    for img in images:
        flops = FlopCountAnalysis(model, [{"image": img}])
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        # Detectron2's tracing wrapper names the model "model"; SOLO's mask output layer is not
        # called as a module (cells' masks are formed from its weights in postprocessing), so
        # candidate-mask formation counts under "rest".
        by_module = {k[len("model."):] if k.startswith("model.") else k: v
                     for k, v in flops.by_module().items()}
        total = flops.total()
        backbone = by_module.get("backbone", 0)
        heads = sum(by_module.get(k, 0) for k in ("head", "proposal_generator", "roi_heads"))
        per_stage["total"] += total / 1e9
        per_stage["backbone"] += backbone / 1e9
        per_stage["heads"] += heads / 1e9
        per_stage["rest"] += (total - backbone - heads) / 1e9
    return {k: v / len(images) for k, v in per_stage.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config-file")
    src.add_argument("--model-zoo", help="a Detectron2 model-zoo config, e.g. COCO-InstanceSegmentation/...")
    p.add_argument("--tasks", nargs="+", default=["flop", "parameter"], choices=["flop", "parameter"])
    p.add_argument("--num-inputs", type=int, default=3)
    p.add_argument("--size", nargs=2, type=int, default=None, metavar=("H", "W"))
    p.add_argument("--candidates", type=int, default=500, help="SOLO candidates forced (tools/benchmark.py)")
    p.add_argument("--json", default=None)
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args(argv)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    logging.getLogger("detectron2").setLevel(logging.ERROR)
    torch.set_num_threads(2)

    cfg, model = build(args)
    model.eval()
    out = {"config": args.config_file or args.model_zoo}
    if "parameter" in args.tasks:
        from fvcore.nn import parameter_count, parameter_count_table

        counts = parameter_count(model)
        out["params_M"] = {k: counts[k] / 1e6 for k in ("", "backbone", "head", "proposal_generator", "roi_heads") if k in counts}
        print(parameter_count_table(model, max_depth=2))
    if "flop" in args.tasks:
        h, w = args.size or (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        g = torch.Generator().manual_seed(0)
        images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for _ in range(args.num_inputs)]
        calibrate_frozen_bn(model, images[0])
        force_candidates(model, images[0], args.candidates if is_solo(model) else None)
        with torch.no_grad():
            out["gflops"] = count_flops(model, images)
        out["size"] = [h, w]
        print(f"GFLOPs at {h}x{w} (mean of {args.num_inputs} inputs): "
              + ", ".join(f"{k} {v:.1f}" for k, v in out["gflops"].items()))
    if "params_M" in out:
        print("parameters (M): " + ", ".join(f"{k or 'total'} {v:.2f}" for k, v in out["params_M"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    sys.exit(_common.run_tool(main))  # known errors: one line, exit 2
