"""CUDA tests: run only where CUDA is available (a lent GPU machine), skipped elsewhere.

- The tiny config trains a few iterations on the GPU with AMP (Detectron2's AMPTrainer, float16
  with a gradient scaler) for every head, then the same weights predict on the GPU and on the
  CPU: the category scores, the candidates' soft masks and the final detections must agree
  within float tolerance; float16 and bfloat16 inference (``MODEL.SOLO.INFERENCE_DTYPE``) agree
  with the CPU's float32 within their stated tolerance.
- Training from polygon masks (Detectron2's default ``MASK_FORMAT``) on the GPU.
- Post-processing's host-device syncs, counted by ``torch.cuda.set_sync_debug_mode``.
"""
import copy

import numpy as np
import pytest
import torch

from helpers import make_image, tiny_cfg
from solo_d2.engine import CheckedAMPTrainer, Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LOW_THRESHOLDS = {
    "MODEL.SOLO.SCORE_THRESH_TEST": 0.0,
    "MODEL.SOLO.MASK_THRESH_TEST": 0.0,  # after 5 iterations masks are ~0.01: keep every candidate
    "MODEL.SOLO.UPDATE_THRESH_TEST": 0.0,
    "MODEL.SOLO.MAX_PER_IMAGE": 10,
}


#: reduced-precision inference against the CPU's float32, on the 5-iteration model: category
#: probabilities and final scores (float16 keeps 11 bits of mantissa, bfloat16 8)
REDUCED_TOLERANCE = {"float16": 0.005, "bfloat16": 0.02}

HEADS = ["SOLOHead", "DecoupledSOLOHead", "DecoupledSOLOLightHead", "DecoupledSOLOCompactHead",
         "SOLOv2Head"]


@pytest.mark.parametrize("head", HEADS)
def test_amp_training_then_gpu_and_cpu_predictions_agree(head, tiny_dataset, tmp_path):
    cfg = tiny_cfg(head, **LOW_THRESHOLDS)
    cfg.MODEL.DEVICE = "cuda"
    cfg.SOLVER.AMP.ENABLED = True
    cfg.DATASETS.TRAIN = (tiny_dataset,)
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.MAX_ITER = 5
    cfg.OUTPUT_DIR = str(tmp_path)
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    assert isinstance(trainer._trainer, CheckedAMPTrainer)
    trainer.resume_or_load(resume=False)
    trainer.train()
    gpu = trainer.model.eval()
    assert all(torch.isfinite(p).all() for p in gpu.parameters())
    assert all(p.dtype == torch.float32 for p in gpu.parameters())  # AMP keeps float32 weights

    cpu = copy.deepcopy(gpu).to("cpu")
    image, _ = make_image(np.random.default_rng(3))
    x = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        outs = {}
        for name, model in (("cpu", cpu), ("cuda", gpu)):
            images = model.preprocess_image([{"image": x}])
            feats = model.run_backbone(images.tensor)
            cate, mask_feats = model.head([feats[f] for f in model.in_features])
            outs[name] = (cate, mask_feats, model([{"image": x}])[0]["instances"].to("cpu"))
    (cate_c, feats_c, inst_c), (cate_g, feats_g, inst_g) = outs["cpu"], outs["cuda"]
    for a, b in zip(cate_c, cate_g):
        torch.testing.assert_close(b.cpu().sigmoid(), a.sigmoid(), atol=1e-4, rtol=0)
    cells = torch.arange(4)
    for level, (a, b) in enumerate(zip(feats_c, feats_g)):
        zeros = torch.zeros_like(cells)
        ma = cpu.head.mask_probs(a, level, zeros, cells)
        mb = gpu.head.mask_probs(b, level, zeros.cuda(), cells.cuda())
        torch.testing.assert_close(mb.cpu(), ma, atol=1e-4, rtol=0)
    assert len(inst_c) == len(inst_g) > 0
    assert inst_g.pred_masks.dtype == torch.bool and inst_g.scores.dtype == torch.float32
    torch.testing.assert_close(inst_g.scores, inst_c.scores, atol=1e-3, rtol=0)
    assert torch.equal(inst_g.pred_classes, inst_c.pred_classes)
    inter = (inst_g.pred_masks & inst_c.pred_masks).flatten(1).sum(1).float()
    union = (inst_g.pred_masks | inst_c.pred_masks).flatten(1).sum(1).float().clamp(min=1)
    assert (inter / union).min() >= 0.98

    # float16 and bfloat16 inference on the GPU (autocast) against the CPU's float32.
    for dtype, tol in REDUCED_TOLERANCE.items():
        gpu.inference_dtype = dtype
        try:
            with torch.no_grad():
                inst_r = gpu([{"image": x}])[0]["instances"].to("cpu")
        finally:
            gpu.inference_dtype = "float32"
        assert len(inst_r) == len(inst_c), dtype
        assert inst_r.scores.dtype == torch.float32 and torch.isfinite(inst_r.scores).all(), dtype
        torch.testing.assert_close(inst_r.scores, inst_c.scores, atol=tol, rtol=0, msg=dtype)


def test_polygon_masks_train_on_cuda():
    # Detectron2's default MASK_FORMAT is polygon: PolygonMasks stay on the host through
    # Instances.to(device); the target generator rasterises them and moves them to the GPU.
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances, PolygonMasks

    cfg = tiny_cfg("SOLOHead")
    cfg.MODEL.DEVICE = "cuda"
    torch.manual_seed(0)
    model = build_model(cfg).train()
    polys = [[[10.0, 10.0, 60.0, 10.0, 60.0, 60.0, 10.0, 60.0]], [[70.0, 30.0, 120.0, 30.0, 95.0, 110.0]]]
    inst = Instances((128, 128))
    inst.gt_masks = PolygonMasks(polys)
    inst.gt_boxes = Boxes(inst.gt_masks.get_bounding_boxes().tensor)
    inst.gt_classes = torch.tensor([1, 2])
    image, _ = make_image(np.random.default_rng(0))
    x = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
    with torch.autocast("cuda", dtype=torch.float16):
        losses = model([{"image": x, "instances": inst}])
    total = sum(losses.values())
    assert torch.isfinite(total) and total.device.type == "cuda"
    total.backward()


@pytest.mark.parametrize("head", ["SOLOHead", "SOLOv2Head"])
def test_postprocessing_syncs_on_cuda(head):
    # torch.cuda.set_sync_debug_mode warns at every synchronising call: post-processing of an
    # image (every cell of every class a candidate) stays within the CPU census's bound.
    import warnings

    from detectron2.modeling import build_model

    cfg = tiny_cfg(head, **{**LOW_THRESHOLDS, "MODEL.SOLO.MAX_PER_IMAGE": 100})
    cfg.MODEL.DEVICE = "cuda"
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image, _ = make_image(np.random.default_rng(3))
    batch = [{"image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))}]
    with torch.no_grad():
        images = model.preprocess_image(batch)
        feats = model.run_backbone(images.tensor)
        cate, mask_feats = model.float_outputs(*model.head([feats[f] for f in model.in_features]))
        model.inference_from_outputs(cate, mask_feats, images, batch)  # warm-up (constants)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = model.inference_from_outputs(cate, mask_feats, images, batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(out[0]["instances"]) > 0
    assert len(syncs) <= 12, [str(w.message) for w in syncs]


def test_box_paste_and_bfloat16_inference_on_cuda():
    """The box-limited paste gives the full paste's masks on CUDA tensors too, and bfloat16
    inference (CUDA autocast) keeps the output contract."""
    from detectron2.modeling import build_model

    from solo_d2.modeling.mask_paste import paste_masks_full, paste_masks_in_boxes

    g = torch.Generator().manual_seed(0)
    soft = (torch.rand(5, 50, 84, generator=g) * 0.4).cuda()
    soft[0, 10:20, 30:50] = 0.9
    soft[1, :5, :5] = 0.8
    for out in ((200, 333), (120, 200)):
        full = paste_masks_full(soft, (200, 336), (200, 333), out, 0.5)
        assert torch.equal(paste_masks_in_boxes(soft, (200, 336), (200, 333), out, 0.5), full)

    cfg = tiny_cfg("SOLOHead", **LOW_THRESHOLDS)
    cfg.MODEL.DEVICE = "cuda"
    cfg.MODEL.SOLO.INFERENCE_DTYPE = "bfloat16"
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image, _ = make_image(np.random.default_rng(3))
    x = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
    with torch.no_grad():
        inst = model([{"image": x}])[0]["instances"]
    assert len(inst) > 0 and inst.pred_masks.dtype == torch.bool
    assert inst.scores.dtype == torch.float32 and inst.pred_classes.dtype == torch.int64
