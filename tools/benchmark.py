#!/usr/bin/env python
"""Speed and memory of solo_d2's models beside Detectron2's Mask R-CNN, one input, one machine.

    python tools/benchmark.py memory   # peak memory (and time) of a training step and of inference
    python tools/benchmark.py latency  # inference per stage: preprocess, backbone+FPN, heads, postprocess
    python tools/benchmark.py train    # training step per stage: forward, targets, losses, backward
    python tools/benchmark.py targets  # target generation vs instance count (1, 10, 50, 200)
    python tools/benchmark.py scaling  # inference vs input size (short side 512, 800, 1024) and
                                       # vs SOLO candidates (50, 500, 2000)
    python tools/benchmark.py all --json results.json

Common options: ``--models`` (default: SOLO DecoupledSOLO DecoupledSOLO_Light SOLOv2 MaskRCNN;
a model whose config is not in the checkout is skipped with a note), ``--runs`` (timed runs
after one warm-up), ``--threads`` (default 2; the same for every model), ``--size H W``
(default: each model's reference size: 800x1333, 512x852 for the light model), ``--device
cpu|cuda``, ``--amp`` (CUDA autocast, float16), ``--dtype float32|bfloat16`` (SOLO models'
``MODEL.SOLO.INFERENCE_DTYPE``), ``--candidates N`` (default 500, see below).

Models: ``SOLO``, ``DecoupledSOLO``, ``DecoupledSOLO_Light`` (solo_d2's COCO configs, R-50-FPN),
``SOLO_S2`` (vanilla SOLO forming all S^2 masks of every level, as reference implementations do;
solo_d2 forms only the masks it needs), and ``MaskRCNN`` (Detectron2's
``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml``). Weights are random.

How the postprocess load is made realistic with random weights (it would otherwise be empty):
for SOLO models the category bias is set to 0 and the mask output weights are re-drawn, and
``SCORE_THRESH_TEST`` is set (on the benchmark image, before timing) so that exactly
``--candidates`` (cell, class) pairs pass point NMS and the threshold: with the default 500
(``NMS_PRE``), 500 candidates enter mask formation, maskness and Matrix NMS, and
``MAX_PER_IMAGE`` (100) masks are pasted at full resolution. (Every cell of every class, ~300,000
pairs at 800x1333, would otherwise go through mask formation.) ``--masks objects`` replaces the
candidates' speckle masks of random weights by object-like ones after computing them (see
``force_candidates`` in ``tools/_common.py``); ``random`` (default) keeps them.
For Mask R-CNN the class logits get a random per-class bias (N(0, 3^2)), so a few classes pass the
default 0.05 score threshold for every proposal (at 800x1333: 1000 proposals, about 5,500 boxes
into per-class NMS, 100 detections to the mask head, 100 masks pasted). Both models thus output up
to 100 instances (SOLO's Matrix NMS may decay some below ``UPDATE_THRESH_TEST``).

Random backbones: every FrozenBatchNorm2d gets the statistics of its input on the benchmark image
(one calibration pass), so activations have the scale of a trained network.

Memory: each (model, mode) runs in a fresh subprocess. CPU: peak resident memory (``ru_maxrss``)
and its rise above the memory before the first step; CUDA: ``torch.cuda.max_memory_allocated``.
Training steps use ``--instances`` (default 10) GT squares of sizes spread over every level.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from _common import REPO, calibrate_frozen_bn, force_candidates, is_solo, load_cfg
COCO = "configs/COCO-InstanceSegmentation/"
MODELS = {
    "SOLO": (COCO + "SOLO_R50_1x.yaml", (800, 1333)),
    "SOLO_S2": (COCO + "SOLO_R50_1x.yaml", (800, 1333)),
    "DecoupledSOLO": (COCO + "DecoupledSOLO_R50_1x.yaml", (800, 1333)),
    "DecoupledSOLO_Light": (COCO + "DecoupledSOLO_Light_R50_3x.yaml", (512, 852)),
    "SOLOv2": (COCO + "SOLOv2_R50_1x.yaml", (800, 1333)),
    "SOLOv2_Light": (COCO + "SOLOv2_Light_R50.yaml", (448, 768)),
    "MaskRCNN": ("model_zoo:COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", (800, 1333)),
}
DEFAULT_MODELS = ["SOLO", "DecoupledSOLO", "DecoupledSOLO_Light", "SOLOv2", "SOLOv2_Light", "MaskRCNN"]
#: inference sizes (short side 512, 800, 1024 at 800x1333's aspect) and SOLO candidate counts of
#: the ``scaling`` run
SCALING_SIZES = [(512, 852), (800, 1333), (1024, 1706)]
SCALING_CANDIDATES = [50, 500, 2000]


def available(name):
    """Whether the model's config is in this checkout (model-zoo configs always are)."""
    path = MODELS[name][0]
    return path.startswith("model_zoo:") or (REPO / path).is_file()


# ---------------------------------------------------------------------------------------------
# building models and inputs
# ---------------------------------------------------------------------------------------------
def build_cfg(name, device="cpu", dtype="float32"):
    path = MODELS[name][0]
    if path.startswith("model_zoo:"):
        cfg = load_cfg(model_zoo=path[len("model_zoo:"):], device=device)
        if dtype != "float32":
            raise ValueError(f"--dtype {dtype}: only SOLO models have MODEL.SOLO.INFERENCE_DTYPE")
    else:
        cfg = load_cfg(str(REPO / path), device=device)
        cfg.MODEL.SOLO.INFERENCE_DTYPE = dtype
    cfg.MODEL.WEIGHTS = ""
    return cfg


def build(name, device="cpu", dtype="float32"):
    import torch
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(build_cfg(name, device, dtype))
    if name == "SOLO_S2":
        head = model.head

        def mask_probs_via_all_s2(mask_feat, level, img_idx, cell_idx, out_size=None):
            from solo_d2.modeling.solo_head import resize_probs

            return resize_probs(head.full_mask_probs(mask_feat, level)[img_idx, cell_idx], out_size)

        head.mask_probs = mask_probs_via_all_s2
    return model


def gt_instances(h, w, n, device, num_classes=80):
    """``n`` GT squares, sizes log-spaced from 20 px to 0.8 * min(h, w), at seeded positions."""
    import torch
    from detectron2.structures import BitMasks, Instances

    g = torch.Generator().manual_seed(0)
    inst = Instances((h, w))
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        size = int(20 * (0.8 * min(h, w) / 20) ** (i / max(n - 1, 1)))
        y0 = int(torch.randint(0, h - size + 1, (1,), generator=g))
        x0 = int(torch.randint(0, w - size + 1, (1,), generator=g))
        masks[i, y0 : y0 + size, x0 : x0 + size] = True
    inst.gt_masks = BitMasks(masks)
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
    inst.gt_classes = torch.arange(n) % num_classes
    return inst.to(device)


class Timer:
    """Named stage timings (seconds) with device synchronisation."""

    def __init__(self, device):
        import torch

        self.cuda = str(device).startswith("cuda")
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.times = {}

    def __call__(self, name, fn, *args, **kwargs):
        self.sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
        return out


# ---------------------------------------------------------------------------------------------
# one inference / one training step, split into stages
# ---------------------------------------------------------------------------------------------
def infer_stages(model, batch, t: Timer):
    """Inference of ``batch`` with stage timings; returns the number of output instances."""
    images = t("preprocess", model.preprocess_image, batch)
    if is_solo(model):  # SOLO.inference's steps (one group: one image)
        with model.inference_autocast():
            feats = t("backbone", model.run_backbone, images.tensor)

            def heads():
                return model.float_outputs(*model.head([feats[f] for f in model.in_features]))

            cate, mask_feats = t("heads", heads)
        out = t("postprocess", model.inference_from_outputs, cate, mask_feats, images, batch)
    else:  # Detectron2's GeneralizedRCNN.inference, split the same way
        from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN

        feats = t("backbone", model.backbone, images.tensor)

        def heads():
            proposals, _ = model.proposal_generator(images, feats, None)
            results, _ = model.roi_heads(images, feats, proposals, None)
            return results

        results = t("heads", heads)
        out = t("postprocess", GeneralizedRCNN._postprocess, results, batch, images.image_sizes)
    return sum(len(o["instances"]) for o in out)


def train_stages(model, batch, t: Timer, amp=False):
    import torch
    from detectron2.utils.events import EventStorage

    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cuda") if amp else nullcontext()
    with ctx, EventStorage():  # Mask R-CNN logs training statistics into it
        if is_solo(model):
            images = model.preprocess_image(batch)

            def forward():
                feats = model.run_backbone(images.tensor)
                return model.head([feats[f] for f in model.in_features])

            cate, mask_feats = t("forward", forward)
            gts = [x["instances"] for x in batch]
            targets = t(
                "targets",
                model.targets,
                gts,
                tuple(images.tensor.shape[-2:]),
                [model.head.mask_size(m) for m in mask_feats],
            )
            losses = t("losses", model.losses, cate, mask_feats, targets)
        else:  # Mask R-CNN: target matching happens inside its heads; not separable
            losses = t("forward", model, batch)
        total = sum(losses.values())
    t("backward", total.backward)


# ---------------------------------------------------------------------------------------------
# workers (one subprocess each)
# ---------------------------------------------------------------------------------------------
def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _summary(samples):
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
    }


def worker(a):
    import torch

    torch.set_num_threads(a.threads)
    model = build(a.model, a.device, a.dtype)
    h, w = a.size
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, device=a.device)
    calibrate_frozen_bn(model, image)
    cuda = a.device.startswith("cuda")
    result = {"model": a.model, "mode": a.mode, "size": [h, w], "device": a.device,
              "threads": a.threads, "dtype": a.dtype}
    if cuda:
        result["device_name"] = torch.cuda.get_device_name()

    if a.mode == "targets":
        # Target generation alone, and its share of a whole training step, per instance count.
        model.train()
        rows = []
        for n in a.counts:
            batch = [{"image": image, "instances": gt_instances(h, w, n, a.device)}]
            tgt, step = [], []
            for i in range(a.runs + 1):
                t = Timer(a.device)
                train_stages(model, batch, t, a.amp)
                if i:
                    tgt.append(t.times["targets"])
                    step.append(sum(t.times.values()))
            rows.append({"instances": n, "targets": _summary(tgt), "step": _summary(step),
                         "share": statistics.median(tgt) / statistics.median(step)})
        result["rows"] = rows
        print(json.dumps(result))
        return

    if a.mode == "train":
        model.train()
        batch = [{"image": image, "instances": gt_instances(h, w, a.instances, a.device)}]

        def step(t):
            train_stages(model, batch, t, a.amp)

    else:
        model.eval()
        thresh = force_candidates(model, image, a.candidates if is_solo(model) else None,
                                  object_masks=a.masks == "objects")
        if thresh is not None:
            result["candidates"], result["score_thresh"] = a.candidates, thresh
            result["masks"] = a.masks
        batch = [{"image": image}]

        def step(t):
            ctx = torch.autocast("cuda") if a.amp else nullcontext()
            with torch.inference_mode(), ctx:
                result["outputs"] = infer_stages(model, batch, t)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mb()
    stages = {}
    totals = []
    for i in range(a.runs + 1):
        t = Timer(a.device)
        step(t)
        if i:
            totals.append(sum(t.times.values()))
            for k, v in t.times.items():
                stages.setdefault(k, []).append(v)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result.update(_summary(totals))
    result["runs"] = len(totals)
    result["stages"] = {k: _summary(v) for k, v in stages.items()}
    result["mem_before_mb"] = round(before, 1)
    result["peak_mb"] = round(peak, 1)
    result["peak_rise_mb"] = round(peak - before, 1)
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def run_worker(model, mode, a):
    size = a.size or MODELS[model][1]
    cmd = [
        sys.executable, __file__, "_worker", "--model", model, "--mode", mode,
        "--size", str(size[0]), str(size[1]), "--runs", str(a.runs), "--threads", str(a.threads),
        "--instances", str(a.instances), "--device", a.device,
        "--counts", *[str(c) for c in a.counts], "--dtype", a.dtype,
        "--candidates", str(a.candidates), "--masks", a.masks,
    ] + (["--amp"] if a.amp else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"benchmark of {model} ({mode}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ms(x):
    return f"{x * 1000:8.1f}"


def report(r):
    size = f"{r['size'][0]}x{r['size'][1]}"
    if r["mode"] == "targets":
        for row in r["rows"]:
            print(f"{r['model']:20s} targets {size}  {row['instances']:4d} instances: "
                  f"targets {_ms(row['targets']['median_s'])} ms  step {_ms(row['step']['median_s'])} ms  "
                  f"share {100 * row['share']:5.1f}%", flush=True)
        return
    stages = "  ".join(f"{k} {_ms(v['median_s']).strip()}" for k, v in r["stages"].items())
    extra = ""
    if "outputs" in r:
        post = r["stages"]["postprocess"]["median_s"] / r["median_s"]
        extra = f"  postprocess share {100 * post:.1f}%  outputs {r['outputs']}"
        if "candidates" in r:
            extra += f"  candidates {r['candidates']} ({r.get('masks', 'random')} masks)"
    print(f"{r['model']:20s} {r['mode']:6s} {size} {r.get('dtype', 'float32')} "
          f"threads {r['threads']}  median {_ms(r['median_s'])} ms "
          f"(min {_ms(r['min_s']).strip()}, max {_ms(r['max_s']).strip()}, n={r['runs']})  "
          f"peak {r['peak_mb']:8.1f} MB (rise {r['peak_rise_mb']:.1f})  [{stages}]" + extra,
          flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["memory", "latency", "train", "targets", "scaling", "all", "_worker"])
    p.add_argument("--models", nargs="+", default=None, choices=list(MODELS))
    p.add_argument("--size", nargs=2, type=int, default=None, metavar=("H", "W"))
    p.add_argument("--runs", type=int, default=None, help="timed runs after one warm-up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--instances", type=int, default=10)
    p.add_argument("--counts", nargs="+", type=int, default=[1, 10, 50, 200])
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="SOLO models' MODEL.SOLO.INFERENCE_DTYPE (several: each in turn, same run)")
    p.add_argument("--masks", default="random", choices=["random", "objects"],
                   help="SOLO candidates' mask values: as the random weights give them, or "
                        "object-like (tools/_common.py force_candidates)")
    p.add_argument("--candidates", type=int, default=500,
                   help="SOLO (cell, class) candidates forced into inference's postprocess")
    p.add_argument("--json", default=None, help="also write every result here")
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.what == "_worker":
        a.runs = a.runs or 5
        a.dtype = a.dtype[0]
        return worker(a)

    plan = {
        "memory": [("train", 5), ("infer", 5)],
        "latency": [("infer", 10)],
        "train": [("train", 5)],
        "targets": [("targets", 5)],
        "scaling": [("infer", 5)],
    }
    todo = ["train", "latency", "targets"] if a.what == "all" else [a.what]
    results = []
    for what in todo:
        models = a.models or (["SOLO"] if what in ("targets", "scaling") else DEFAULT_MODELS)
        for model in models:
            if not available(model):
                print(f"{model:20s} skipped: {MODELS[model][0]} is not in this checkout", flush=True)
                continue
            for mode, runs in plan[what]:
                if what == "targets" and model in ("MaskRCNN",):
                    continue
                dtypes = a.dtype if model != "MaskRCNN" else ["float32"]
                variants = [{"dtype": d} for d in dtypes]
                if what == "scaling":
                    variants = [{"dtype": d, "size": s} for d in dtypes for s in SCALING_SIZES]
                    if model != "MaskRCNN":
                        variants += [{"dtype": d, "candidates": c} for d in dtypes
                                     for c in SCALING_CANDIDATES if c != a.candidates]
                for v in variants:
                    sub = argparse.Namespace(**vars(a))
                    sub.runs = a.runs or runs
                    for k, val in v.items():
                        setattr(sub, k, val)
                    r = run_worker(model, mode, sub)
                    r["what"] = what
                    results.append(r)
                    report(r)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
