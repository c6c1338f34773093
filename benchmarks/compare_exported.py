#!/usr/bin/env python
"""Parity and latency of exported SOLO models (ONNX Runtime, torch.export, OpenVINO if installed)
against eager PyTorch, on one config. Figures: docs/benchmarks/deploy.md.

    # a trained model on shapes_val images (the first N of DATASETS.TEST; --include-empty adds
    # an image without objects):
    python benchmarks/compare_exported.py --config-file output/demo_model/config.yaml \\
        --images 20 --include-empty MODEL.WEIGHTS output/demo_model/model_final.pth
    # random weights at a fixed size (every head type), with latency:
    python benchmarks/compare_exported.py --config-file configs/COCO-InstanceSegmentation/SOLO_R50_1x.yaml \\
        --random-weights --size 800 1333 --images 3 --latency 5

Parity, per image and detection: same number of detections and classes, scores within 1e-3,
mask IoU >= 0.99. With ``--random-weights`` the backbone's frozen BatchNorm statistics are
calibrated on the first image and the category branch is made to score every cell about equally
(as ``tools/benchmark.py`` does), and the score threshold is set so that about
``--candidates`` (cell, class) pairs pass it on the first image: the exported graph forms all
candidates' masks at once (it has no chunked path), so all cells passing is not a shape it is
meant for.

Latency is end to end as a user times it, batch 1: eager ``SOLOPredictor(image)`` (resize, model,
masks at the image size) against ``demo/onnx_demo.py``'s ``ONNXSOLO(image)`` (same steps with
OpenCV) and the same with OpenVINO; medians of ``--latency`` runs after one warm-up, the runtimes
taking turns.
"""
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time

import _setup  # noqa: F401  (the checkout's solo_d2 and tools/ first on sys.path)
from _setup import REPO, calibrate_frozen_bn, config_parser, force_candidates  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def parse():
    p = config_parser(__doc__)
    p.add_argument("--images", type=int, default=20, help="images to compare")
    p.add_argument("--include-empty", action="store_true", help="add an image with no object")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="resize every image to this size (random-weight runs)")
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0,
                   help="torch seed of the random weights (a failing random-weight run can be rerun)")
    p.add_argument("--latency", type=int, default=0, help="timed runs per runtime (0: no timing)")
    p.add_argument("--no-openvino", action="store_true")
    p.add_argument("--eval", action="store_true", help="also COCO-evaluate eager and ONNX on DATASETS.TEST")
    return p.parse_args()


def load_images(cfg, n, size, include_empty):
    """BGR uint8 images: the first n of DATASETS.TEST (or shapes_val), resized to ``size``."""
    import cv2
    from detectron2.data import DatasetCatalog

    name = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "shapes_val"
    dicts = DatasetCatalog.get(name)
    chosen = dicts[:n]
    if include_empty:
        empty = [d for d in dicts if not d.get("annotations")]
        if empty and empty[0] not in chosen:
            chosen = chosen[: n - 1] + [empty[0]]
        elif not empty:
            chosen = chosen[: n - 1] + [None]  # no empty image in the split: a blank one
    images = []
    empty_at = [i for i, d in enumerate(chosen) if d is None or not d.get("annotations")]
    print(f"images without objects: {empty_at} of {len(chosen)}")
    for d in chosen:
        if d is None:
            img = np.full_like(images[0], 114)
        else:
            img = cv2.imread(d["file_name"], cv2.IMREAD_COLOR)
        if size:
            img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        images.append(img)
    return name, images


def mask_iou(a, b):
    a, b = torch.as_tensor(np.asarray(a)).bool().flatten(1), torch.as_tensor(np.asarray(b)).bool().flatten(1)
    union = (a | b).sum(1).float()
    return torch.where(union > 0, (a & b).sum(1).float() / union.clamp(min=1), torch.ones_like(union))


def compare(ref, got):
    """(ok, n_ref, n_got, max score difference, min mask IoU, why) for one image; ``why`` names
    the detections without a counterpart when it fails (else "").

    Detections are matched in order; where scores within 1e-5 of each other come out in another
    order (random-weight models have many near-equal scores, and the runtimes round differently),
    each detection that fails in order (class, score or mask) is matched to a detection of the same class with the nearest score and the
    best mask IoU among those within 1e-3."""
    masks, scores, classes = (np.asarray(x) for x in got[:3])
    ref_masks, ref_scores, ref_classes = ref[0], ref[1].numpy(), ref[2].numpy()
    n_ref, n = len(ref_scores), len(scores)
    if n_ref != n or tuple(masks.shape) != tuple(ref_masks.shape):
        return False, n_ref, n, float("nan"), float("nan"), f"{n_ref} detections, got {n}"
    if n == 0:
        return True, 0, 0, 0.0, 1.0, ""
    masks = torch.as_tensor(masks)
    match = np.arange(n)
    in_order_iou = mask_iou(ref_masks, masks).numpy()
    unmatched = np.nonzero((classes != ref_classes) | (np.abs(scores - ref_scores) > 1e-3)
                           | (in_order_iou < 0.99))[0]
    free = set(unmatched.tolist())
    for i in unmatched:
        cands = [j for j in free if classes[j] == ref_classes[i] and abs(scores[j] - ref_scores[i]) <= 1e-3]
        if not cands:
            return False, n_ref, n, float("nan"), float("nan"), unmatched_report(ref, got)
        j = max(cands, key=lambda j: float(mask_iou(ref_masks[i : i + 1], masks[j : j + 1])[0]))
        match[i] = j
        free.discard(j)
    ds = float(np.abs(scores[match] - ref_scores).max())
    iou = float(mask_iou(ref_masks, masks[match]).min())
    ok = ds <= 1e-3 and iou >= 0.99
    return ok, n_ref, n, ds, iou, "" if ok else unmatched_report(ref, got)


def unmatched_report(ref, got):
    """The detections of each side that have no counterpart on the other (same class, score
    within 1e-3, mask IoU >= 0.99), as (rank, class, score), and each side's last score: says
    whether a failure is at the cut (the last places) or in the body of the ranking."""
    rm, rs, rc = torch.as_tensor(np.asarray(ref[0])), np.asarray(ref[1]), np.asarray(ref[2])
    gm, gs, gc = torch.as_tensor(np.asarray(got[0])), np.asarray(got[1]), np.asarray(got[2])
    ok = (rc[:, None] == gc[None]) & (np.abs(rs[:, None] - gs[None]) <= 1e-3)
    for i, j in zip(*np.nonzero(ok)):
        ok[i, j] = float(mask_iou(rm[i : i + 1], gm[j : j + 1])[0]) >= 0.99
    fmt = lambda idx, s, c: [(int(k), int(c[k]), round(float(s[k]), 6)) for k in idx]  # noqa: E731
    return (f"eager without counterpart (rank, class, score): {fmt(np.nonzero(~ok.any(1))[0], rs, rc)}, "
            f"last score {rs[-1]:.6f}; exported without counterpart: {fmt(np.nonzero(~ok.any(0))[0], gs, gc)}, "
            f"last score {gs[-1]:.6f}")


def main():
    args = parse()
    torch.set_num_threads(args.threads)
    import solo_d2  # noqa: F401
    from solo_d2.config import get_solo_cfg
    from solo_d2.deploy import SOLODeployModel
    from solo_d2.deploy.exporter import deploy_metadata, export_onnx, export_torch
    from solo_d2.deploy.runtime import onnx_runner
    from solo_d2.modeling.postprocessing import point_nms
    from solo_d2.predictor import SOLOPredictor

    cfg = get_solo_cfg(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    if args.size:  # the test resize keeps the given size
        cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = min(args.size), max(args.size)
    if args.random_weights:
        cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    torch.manual_seed(args.seed)
    predictor = SOLOPredictor(cfg, allow_partial_weights=True if args.random_weights else None)
    model = predictor.model
    dataset, images = load_images(cfg, args.images, args.size, args.include_empty)
    import importlib.util

    spec = importlib.util.spec_from_file_location("onnx_demo", REPO / "demo" / "onnx_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)

    wrapper = SOLODeployModel(model).eval()
    first = torch.as_tensor(np.ascontiguousarray(
        (images[0][:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else images[0]).transpose(2, 0, 1)))
    if args.random_weights:
        calibrate_frozen_bn(model, first.float())
        force_candidates(model)
        with torch.no_grad():
            x = ((first.float() - model.pixel_mean) / model.pixel_std)[None]
            feats = model.backbone(torch.nn.functional.pad(x, (0, (-x.shape[-1]) % 32, 0, (-x.shape[-2]) % 32)))
            cate, _ = model.head([feats[f] for f in model.in_features])
            probs = torch.cat([point_nms(c[0].sigmoid()).flatten() for c in cate])
        thresh = float(probs.topk(min(args.candidates, probs.numel())).values[-1])
        model.postprocess.score_thresh = thresh
        print(f"random weights (--seed {args.seed}): SCORE_THRESH_TEST set to {thresh:.6f} ({args.candidates} candidates on image 0)")

    # The exported model and the evaluators' files are scratch: removed however the tool exits.
    tmp = tempfile.mkdtemp(prefix="solo_deploy_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    onnx_path = os.path.join(tmp, "model.onnx")
    t = time.perf_counter()
    ep = export_torch(wrapper, first)
    t_ep = time.perf_counter() - t
    t = time.perf_counter()
    export_onnx(wrapper, first, onnx_path, exported_program=ep, metadata=deploy_metadata(cfg))
    print(f"{cfg.MODEL.SOLO.HEAD_TYPE}: torch.export {t_ep:.0f} s, ONNX {time.perf_counter() - t:.0f} s, "
          f"{os.path.getsize(onnx_path) / 1e6:.0f} MB")
    runner = demo.ONNXSOLO(onnx_path, args.threads)
    ort_run = onnx_runner(onnx_path, args.threads)
    ep_module = ep.module()
    rows = {"onnxruntime": [], "torch.export": []}
    for i, bgr in enumerate(images):
        image = torch.as_tensor(runner.prepare(bgr))
        with torch.no_grad():
            ref = wrapper(image)
            ep_out = ep_module(image)
        rows["torch.export"].append(compare(ref, ep_out))
        rows["onnxruntime"].append(compare(ref, ort_run(image)))
    print(f"parity on {len(images)} images of {dataset} at {tuple(images[0].shape[:2])} "
          f"(detections per image: {[r[1] for r in rows['onnxruntime']]}):")
    all_ok = True
    for name, r in rows.items():
        ok = all(x[0] for x in r)
        all_ok &= ok
        print(f"  {name}: {'PASS' if ok else 'FAIL'}; max |score diff| {max(x[3] for x in r):.2e}, "
              f"min mask IoU {min(x[4] for x in r):.4f}, failing images {[i for i, x in enumerate(r) if not x[0]]}")
        for i, x in enumerate(r):
            if not x[0]:
                print(f"    image {i}: {x[5]}")

    if args.latency:
        busiest = max(range(len(images)), key=lambda i: rows["onnxruntime"][i][1])
        latency(args, predictor, runner, onnx_path, images[busiest])
    if args.eval:
        evaluate(cfg, model, onnx_path, tmp, args.threads)
    sys.exit(0 if all_ok else 1)


def latency(args, predictor, runner, onnx_path, bgr):
    fns = {"eager PyTorch (SOLOPredictor)": lambda: predictor(bgr), "ONNX Runtime (onnx_demo.ONNXSOLO)": lambda: runner(bgr)}
    if not args.no_openvino:
        try:
            import openvino as ov

            core = ov.Core()
            core.set_property("CPU", {"INFERENCE_NUM_THREADS": args.threads})
            compiled = core.compile_model(onnx_path, "CPU")
            runner_ov = type(runner).__new__(type(runner))
            runner_ov.__dict__.update(runner.__dict__)

            class OVSession:
                def run(self, _, feeds):
                    res = compiled(feeds)
                    return [res[o] for o in compiled.outputs]

            runner_ov.session = OVSession()
            fns["OpenVINO (same runner)"] = lambda: runner_ov(bgr)
        except Exception as e:  # noqa: BLE001  (optional runtime: report why it is missing)
            print(f"OpenVINO not measured: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    for k, f in list(fns.items()):
        try:
            f()  # warm-up
        except Exception as e:  # noqa: BLE001  (report a runtime that cannot run the model)
            print(f"{k} not measured: {type(e).__name__}: {str(e).splitlines()[-1][:300]}")
            del fns[k]
    times = {k: [] for k in fns}
    for _ in range(args.latency):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1000)
    eager = statistics.median(times["eager PyTorch (SOLOPredictor)"])
    print(f"latency, batch 1, {tuple(bgr.shape[:2])}, {args.threads} threads, median of {args.latency} (min-max) ms:")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"  {k}: {m:.0f} ({min(v):.0f}-{max(v):.0f}), {m / eager:.2f}x eager")


def evaluate(cfg, model, onnx_path, tmp, threads):
    from detectron2.evaluation import inference_on_dataset

    from solo_d2.deploy.runtime import ExportedSOLO, onnx_runner
    from solo_d2.engine import Trainer

    name = cfg.DATASETS.TEST[0]
    for label, m in (("eager", model), ("onnxruntime", ExportedSOLO(onnx_runner(onnx_path, threads)))):
        res = inference_on_dataset(m, Trainer.build_test_loader(cfg, name),
                                   Trainer.build_evaluator(cfg, name, os.path.join(tmp, label)))
        print(f"{label} on {name}: segm AP {res['segm']['AP']:.3f}, bbox AP {res['bbox']['AP']:.3f}")


if __name__ == "__main__":
    main()
