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
cpu|cuda``, ``--amp`` (training: autocast, float16 on CUDA, bfloat16 on the CPU; ``--train-amp
both`` times float32 and AMP steps in one process), ``--dtype float32|float16|bfloat16`` (SOLO
models' ``MODEL.SOLO.INFERENCE_DTYPE``, Mask R-CNN's backbone and heads under autocast in that
dtype; float16 is CUDA only), ``--batch N...`` (inference batch sizes, default 1: a batch of N
copies of the image, in one process), ``--candidates N`` (default 500, see below).

    python tools/benchmark.py syncs    # host-device syncs per image of inference and its postprocess

``syncs`` counts, per image, with :class:`solo_d2.utils.sync_census.SyncCensus` (a dispatch-mode
counter of ``nonzero``, ``unique``, ``item``, ``equal`` and copies to the host), on the CPU also
for the accelerator's paths (``device_paths_on_cpu``), on CUDA also the driver's own count
(``torch.cuda.set_sync_debug_mode("warn")``).

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
    "SOLOv2_Light_R18": (COCO + "SOLOv2_Light_R18.yaml", (448, 768)),
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
        cfg = load_cfg(model_zoo=path[len("model_zoo:"):], device=device)  # dtype: autocast
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
def autocast_for(model, dtype):
    """Mask R-CNN's inference context for ``dtype`` (autocast on the model's device; none for
    float32). SOLO models use their own ``inference_autocast`` (``MODEL.SOLO.INFERENCE_DTYPE``)."""
    import torch

    if dtype == "float32":
        return nullcontext()
    return torch.autocast(model.device.type, dtype=getattr(torch, dtype))


def infer_stages(model, batch, t: Timer, dtype="float32"):
    """Inference of ``batch`` with stage timings; returns the number of output instances.
    ``dtype``: Mask R-CNN's autocast (:func:`autocast_for`); a SOLO model runs in its
    ``inference_dtype``."""
    images = t("preprocess", model.preprocess_image, batch)
    if is_solo(model):  # SOLO.inference's steps (one group: images of one size)
        with model.inference_autocast():
            feats = t("backbone", model.run_backbone, images.tensor)

            def heads():
                return model.float_outputs(*model.head([feats[f] for f in model.in_features]))

            cate, mask_feats = t("heads", heads)
        out = t("postprocess", model.inference_from_outputs, cate, mask_feats, images, batch)
    else:  # Detectron2's GeneralizedRCNN.inference, split the same way
        from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN

        with autocast_for(model, dtype):
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
    # AMP as the trainer runs it: float16 on CUDA, bfloat16 on the CPU (no gradient scaler here:
    # the step's time, not its numerics)
    cuda = next(model.parameters()).device.type == "cuda"
    ctx = (torch.autocast("cuda" if cuda else "cpu", dtype=torch.float16 if cuda else torch.bfloat16)
           if amp else nullcontext())
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
    model = build(a.model, a.device)  # inference dtypes: per variant below
    h, w = a.size
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, device=a.device)
    calibrate_frozen_bn(model, image)
    cuda = a.device.startswith("cuda")
    result = {"model": a.model, "mode": a.mode, "size": [h, w], "device": a.device,
              "threads": a.threads}
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

    # Variants of one model in this process, run in turn each round (interleaved: their ratios
    # hold on a machine whose load changes): inference dtypes x batch sizes, or training
    # without / with AMP.
    if a.mode == "train":
        model.train()
        batch = [{"image": image, "instances": gt_instances(h, w, a.instances, a.device)}]
        amps = {"off": [False], "on": [True], "both": [False, True]}[
            "on" if a.amp and a.train_amp == "off" else a.train_amp]
        variants = [{"amp": amp} for amp in amps]

        def step(t, v):
            train_stages(model, batch, t, v["amp"])

    else:
        model.eval()
        thresh = force_candidates(model, image, a.candidates if is_solo(model) else None,
                                  object_masks=a.masks == "objects")
        if thresh is not None:
            result["candidates"], result["score_thresh"] = a.candidates, thresh
            result["masks"] = a.masks
        variants = []
        for d in a.dtype:
            if d == "float16" and not cuda:
                print(f"# {a.model} float16 skipped: CUDA only (MODEL.SOLO.INFERENCE_DTYPE; CPU "
                      "float16 autocast is not benchmarked)",
                      file=sys.stderr)
                continue
            variants += [{"dtype": d, "batch": n} for n in a.batch]
        outputs = {}

        def step(t, v):
            if is_solo(model):
                model.inference_dtype = v["dtype"]
            with torch.inference_mode():
                outputs[id(v)] = infer_stages(model, [{"image": image}] * v["batch"], t, v["dtype"])

    before = {}
    totals = {id(v): [] for v in variants}
    stages = {id(v): {} for v in variants}
    peaks = {id(v): 0.0 for v in variants}
    for i in range(a.runs + 1):
        for v in variants:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before.setdefault(id(v), torch.cuda.memory_allocated() / 2**20)
            else:
                before.setdefault(id(v), _rss_mb())
            t = Timer(a.device)
            step(t, v)
            peaks[id(v)] = max(peaks[id(v)], torch.cuda.max_memory_allocated() / 2**20 if cuda
                               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            if i:
                totals[id(v)].append(sum(t.times.values()))
                for k, val in t.times.items():
                    stages[id(v)].setdefault(k, []).append(val)
    for v in variants:
        r = dict(result, **v)
        r.update(_summary(totals[id(v)]))
        r["runs"] = len(totals[id(v)])
        r["stages"] = {k: _summary(x) for k, x in stages[id(v)].items()}
        if a.mode != "train":
            r["outputs"] = outputs[id(v)]
        r["mem_before_mb"] = round(before[id(v)], 1)
        r["peak_mb"] = round(peaks[id(v)], 1)
        r["peak_rise_mb"] = round(peaks[id(v)] - before[id(v)], 1)
        # CPU: the process's peak resident memory, so a later variant's includes earlier ones'
        r["peak_scope"] = "variant" if cuda else "process"
        r["interleaved_with"] = len(variants)
        print(json.dumps(r))


def sync_census(a):
    """Host reads (syncs) per image of each model's inference, in this process (module docs)."""
    import warnings

    import torch
    from solo_d2.modeling.layers import device_paths_on_cpu
    from solo_d2.utils.sync_census import SyncCensus

    torch.set_num_threads(a.threads)
    cuda = a.device.startswith("cuda")
    rows = []
    for name in a.models or DEFAULT_MODELS:
        if not available(name):
            continue
        model = build(name, a.device).eval()
        h, w = a.size or MODELS[name][1]
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, device=a.device)
        calibrate_frozen_bn(model, image)
        force_candidates(model, image, a.candidates if is_solo(model) else None,
                         object_masks=a.masks == "objects")
        for n in a.batch:
            batch = [{"image": image}] * n
            paths = [("device", nullcontext)] if cuda else [("cpu", nullcontext), ("device", device_paths_on_cpu)]
            for path, ctx in paths:
                with torch.inference_mode(), ctx():
                    infer_stages(model, batch, Timer(a.device))  # warm-up (constants, caches)
                    row = {"model": name, "batch": n, "size": [h, w], "device": a.device,
                           "paths": path, "candidates": a.candidates if is_solo(model) else None}
                    for stage in ("postprocess", "inference"):
                        if stage == "postprocess":
                            counted = _postprocess_counted(model, batch)
                        else:
                            counted = lambda fn: fn(lambda: infer_stages(model, batch, Timer(a.device)))  # noqa: E731
                        with SyncCensus() as census, warnings.catch_warnings(record=True) as caught:
                            warnings.simplefilter("always")
                            if cuda:
                                torch.cuda.synchronize()
                                torch.cuda.set_sync_debug_mode("warn")
                            try:
                                counted(lambda f: f())
                            finally:
                                if cuda:
                                    torch.cuda.set_sync_debug_mode("default")
                        row[stage] = {"census_per_image": census.total / n, "by_op": dict(census.counts)}
                        if cuda:
                            row[stage]["cuda_sync_warnings_per_image"] = sum(
                                "synchroniz" in str(x.message) for x in caught) / n
                rows.append(row)
                print(f"{name:20s} batch {n} {path:6s} paths: syncs per image: postprocess "
                      f"{row['postprocess']['census_per_image']:.1f}, whole inference "
                      f"{row['inference']['census_per_image']:.1f}"
                      + (f" (cuda: {row['postprocess']['cuda_sync_warnings_per_image']:.1f}, "
                         f"{row['inference']['cuda_sync_warnings_per_image']:.1f})" if cuda else "")
                      + f"  {row['postprocess']['by_op']}", flush=True)
    return rows


def _postprocess_counted(model, batch):
    """Runs what comes before post-processing now (uncounted), and returns ``counted(run)``:
    ``run(f)`` calls ``f``, the post-processing, inside the census. SOLO: ``inference_from_outputs``
    (its heads' ``mask_fn`` included). Mask R-CNN: proposals, box and mask heads and
    ``_postprocess`` (its NMS is in its heads)."""
    images = model.preprocess_image(batch)
    if is_solo(model):
        with model.inference_autocast():
            feats = model.run_backbone(images.tensor)
            cate, mask_feats = model.float_outputs(*model.head([feats[f] for f in model.in_features]))
        return lambda run: run(lambda: model.inference_from_outputs(cate, mask_feats, images, batch))
    from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN

    feats = model.backbone(images.tensor)

    def post():
        proposals, _ = model.proposal_generator(images, feats, None)
        results, _ = model.roi_heads(images, feats, proposals, None)
        return GeneralizedRCNN._postprocess(results, batch, images.image_sizes)

    return lambda run: run(post)


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def run_worker(model, mode, a):
    size = a.size or MODELS[model][1]
    cmd = [
        sys.executable, __file__, "_worker", "--model", model, "--mode", mode,
        "--size", str(size[0]), str(size[1]), "--runs", str(a.runs), "--threads", str(a.threads),
        "--instances", str(a.instances), "--device", a.device,
        "--counts", *[str(c) for c in a.counts], "--dtype", *a.dtype,
        "--batch", *[str(n) for n in a.batch], "--train-amp", a.train_amp,
        "--candidates", str(a.candidates), "--masks", a.masks,
    ] + (["--amp"] if a.amp else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"benchmark of {model} ({mode}) failed:\n{proc.stderr[-3000:]}")
    for line in proc.stderr.splitlines():
        if line.startswith("# "):
            print(line[2:], flush=True)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


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
    variant = (f"amp {'on' if r['amp'] else 'off'}" if "amp" in r
               else f"{r.get('dtype', 'float32')} batch {r.get('batch', 1)}")
    print(f"{r['model']:20s} {r['mode']:6s} {size} {variant} "
          f"threads {r['threads']}  median {_ms(r['median_s'])} ms "
          f"(min {_ms(r['min_s']).strip()}, max {_ms(r['max_s']).strip()}, n={r['runs']})  "
          f"peak {r['peak_mb']:8.1f} MB (rise {r['peak_rise_mb']:.1f})  [{stages}]" + extra,
          flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["memory", "latency", "train", "targets", "scaling", "syncs", "all",
                                    "_worker"])
    p.add_argument("--models", nargs="+", default=None, choices=list(MODELS))
    p.add_argument("--size", nargs=2, type=int, default=None, metavar=("H", "W"))
    p.add_argument("--runs", type=int, default=None, help="timed runs after one warm-up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--instances", type=int, default=10)
    p.add_argument("--counts", nargs="+", type=int, default=[1, 10, 50, 200])
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true",
                   help="training steps under AMP (float16 on CUDA, bfloat16 on the CPU)")
    p.add_argument("--train-amp", default="off", choices=["off", "on", "both"],
                   help="training steps without AMP, with it, or both (in turn, one process)")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float16", "bfloat16"],
                   help="inference dtypes: SOLO models' MODEL.SOLO.INFERENCE_DTYPE, Mask R-CNN's "
                        "autocast (several: in turn, one process per model); float16: CUDA only")
    p.add_argument("--batch", nargs="+", type=int, default=[1],
                   help="inference batch sizes (copies of the image; in turn, one process per model)")
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
        return worker(a)
    if a.what == "syncs":
        rows = sync_census(a)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
        return rows

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
                variants = [{}]  # the dtypes and batch sizes run in one process, interleaved
                if what == "scaling":
                    variants = [{"size": s} for s in SCALING_SIZES]
                    if model != "MaskRCNN":
                        variants += [{"candidates": c} for c in SCALING_CANDIDATES if c != a.candidates]
                for v in variants:
                    sub = argparse.Namespace(**vars(a))
                    sub.runs = a.runs or runs
                    for k, val in v.items():
                        setattr(sub, k, val)
                    for r in run_worker(model, mode, sub):
                        r["what"] = what
                        results.append(r)
                        report(r)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
