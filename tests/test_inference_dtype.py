"""MODEL.SOLO.INFERENCE_DTYPE: bfloat16 inference on CPU keeps the output contract and stays
within a stated tolerance of float32 on a fixed model and image."""
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from helpers import make_image, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 per operation). On the fixed model
#: and image below, float32 and bfloat16 differ by at most 4.4e-4 in category probability,
#: 6e-5 in soft mask and 4e-6 in final score (measured, SOLOHead; DecoupledSOLOHead less); the
#: tolerance allows about 10x that.
PROB_TOLERANCE = 0.005


def _models(head):
    torch.manual_seed(0)
    f32 = build_model(tiny_cfg(head)).eval()
    bf16 = build_model(tiny_cfg(head, **{"MODEL.SOLO.INFERENCE_DTYPE": "bfloat16"})).eval()
    bf16.load_state_dict(f32.state_dict())
    assert bf16.inference_dtype == "bfloat16" and f32.inference_dtype == "float32"
    for m in (f32, bf16):  # untrained (masks ~0.01): every cell a candidate, every mask kept
        m.postprocess.score_thresh = 0.0
        m.postprocess.update_thresh = 0.0
        m.postprocess.mask_thresh = 0.0
        m.postprocess.max_per_image = 10
    return f32, bf16


def _image():
    image, _ = make_image(np.random.default_rng(5), h=160, w=224)
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _head_outputs(model, x):
    with torch.no_grad():
        images = model.preprocess_image([{"image": x}])
        with model.inference_autocast():
            feats = model.run_backbone(images.tensor)
            cate, mask_feats = model.head([feats[f] for f in model.in_features])
        return cate, mask_feats


@pytest.mark.parametrize("head", ["SOLOHead", "DecoupledSOLOHead"])
def test_bfloat16_inference_contract_and_tolerance(head):
    f32, bf16 = _models(head)
    x = _image()
    cate32, feats32 = _head_outputs(f32, x)
    cate16, feats16 = _head_outputs(bf16, x)
    assert cate16[0].dtype == torch.bfloat16  # the head really ran in bfloat16
    cate16, feats16 = bf16.float_outputs(cate16, feats16)
    for a, b in zip(cate32, cate16):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b.sigmoid(), a.sigmoid(), atol=PROB_TOLERANCE, rtol=0)
    cells = torch.arange(6)
    zeros = torch.zeros_like(cells)
    for level, (a, b) in enumerate(zip(feats32, feats16)):
        ma = f32.head.mask_probs(a, level, zeros, cells)
        mb = bf16.head.mask_probs(b, level, zeros, cells)
        torch.testing.assert_close(mb, ma, atol=PROB_TOLERANCE, rtol=0)

    with torch.no_grad():
        out32 = f32([{"image": x, "height": 80, "width": 112}])[0]["instances"]
        out16 = bf16([{"image": x, "height": 80, "width": 112}])[0]["instances"]
    assert len(out16) > 0 and out16.image_size == (80, 112)
    assert out16.scores.dtype == torch.float32 and out16.pred_masks.dtype == torch.bool
    assert out16.pred_classes.dtype == torch.int64 and out16.pred_boxes.tensor.dtype == torch.float32
    # The scores, sorted, within the tolerance of float32's (the same number of detections).
    assert len(out16) == len(out32)
    torch.testing.assert_close(out16.scores, out32.scores, atol=PROB_TOLERANCE, rtol=0)


def test_inference_dtype_is_validated():
    with pytest.raises(ValueError, match="MODEL.SOLO.INFERENCE_DTYPE.*float16"):
        build_model(tiny_cfg("SOLOHead", **{"MODEL.SOLO.INFERENCE_DTYPE": "float16"}))


def test_postprocessing_runs_in_float32_under_a_callers_autocast(monkeypatch):
    # A caller's autocast (e.g. float16 on CUDA) must not reach post-processing: its mask
    # intersections and areas overflow float16. Checked on CPU with bfloat16 autocast: the
    # post-processor sees float32 inputs with autocast off, and the result equals
    # INFERENCE_DTYPE bfloat16's (the same backbone and head precision).
    f32, bf16 = _models("SOLOHead")
    seen = []
    post = f32.postprocess

    def recording(cate_logits, mask_fn, *args):
        seen.append((torch.is_autocast_enabled("cpu"), cate_logits[0].dtype))
        return post(cate_logits, mask_fn, *args)

    monkeypatch.setattr(f32, "postprocess", recording)
    x = _image()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outer = f32([{"image": x}])[0]["instances"]
    with torch.no_grad():
        own = bf16([{"image": x}])[0]["instances"]
    assert seen == [(False, torch.float32)]
    assert torch.equal(outer.scores, own.scores) and torch.equal(outer.pred_masks, own.pred_masks)


def test_float16_inference_is_cuda_only_and_named():
    from solo_d2.modeling.meta_arch import INFERENCE_DTYPES

    assert INFERENCE_DTYPES["float16"] is torch.float16
    # Built for the CPU: refused, naming the key (CPU float16 autocast: use bfloat16 there).
    with pytest.raises(ValueError, match="MODEL.SOLO.INFERENCE_DTYPE float16 needs a CUDA device"):
        build_model(tiny_cfg("SOLOHead", **{"MODEL.SOLO.INFERENCE_DTYPE": "float16"}))
    # A model set to float16 and run on the CPU anyway: refused at inference, not run.
    model = build_model(tiny_cfg("SOLOHead")).eval()
    model.inference_dtype = "float16"
    with pytest.raises(ValueError, match="INFERENCE_DTYPE float16 needs a CUDA device"):
        model([{"image": _image()}])


def _big_mask_case():
    """Post-processor inputs whose masks exceed float16's 65,504 (a 200 x 336 canvas, 67,200
    pixels, the finest mask size of 800 x 1333): 6 candidates of 2 classes, near-full masks
    (some nearly identical, so Matrix NMS decays them), scores known."""
    from solo_d2.modeling import SOLOPostProcessor

    h, w = 200, 336
    cate = [torch.full((2, 4, 4), -10.0), torch.full((2, 2, 2), -10.0)]
    spec = [(0, 0, 3.0), (2, 0, 2.5), (8, 1, 2.0), (10, 1, 1.5), (5, 0, 1.0), (0, 1, 0.5)]
    masks = {}
    for cell, cls, logit in spec:
        cate[0][cls, cell // 4, cell % 4] = logit
        m = torch.full((h, w), 0.9)
        m[: 2 + cell, : 3 + 2 * cell] = 0.2  # slightly different near-full masks
        masks[cell] = m
    assert all(int((m > 0.5).sum()) > 65504 for m in masks.values())

    def mask_fn(level, cells):
        return torch.stack([masks[int(c)] for c in cells] + [torch.zeros(h, w)])[:-1]

    pp = SOLOPostProcessor(num_classes=2, num_grids=[4, 2], min_areas=[8, 16], update_thresh=0.0)
    return pp, cate, mask_fn, (h, w)


#: post-processing runs in float32 with autocast off, so a caller's autocast changes nothing:
#: the same detections, scores equal to float32's within this (in fact bit for bit)
AUTOCAST_SCORE_TOLERANCE = 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_postprocessing_under_a_callers_autocast_equals_float32(dtype):
    from solo_d2.modeling import matrix_nms

    pp, cate, mask_fn, (h, w) = _big_mask_case()
    args = (cate, mask_fn, (h, w), (4 * h, 4 * w), (4 * h - 3, 4 * w - 5), (h, w))
    ref = pp(*args)
    with torch.autocast("cpu", dtype=dtype):
        out = pp(*args)
        # Matrix NMS called directly too (areas 67,200 > 65,504: float16 would give inf, NaN)
        binary = torch.stack([mask_fn(0, torch.tensor([c]))[0] > 0.5 for c in (0, 2, 5)])
        nms = matrix_nms(binary, torch.zeros(3, dtype=torch.long), torch.tensor([0.9, 0.8, 0.7]))
    assert len(ref) == 5 and torch.isfinite(ref.scores).all()  # cell 5 of class 0: point NMS
    assert torch.isfinite(nms).all() and nms.dtype == torch.float32
    assert nms[0] == 0.9 and nms[1] < 0.2  # near-identical masks: IoU ~0.99, decayed
    assert torch.equal(nms, matrix_nms(binary, torch.zeros(3, dtype=torch.long), torch.tensor([0.9, 0.8, 0.7])))
    assert torch.equal(out.pred_classes, ref.pred_classes)
    assert torch.equal(out.pred_masks, ref.pred_masks)
    torch.testing.assert_close(out.scores, ref.scores, rtol=0, atol=AUTOCAST_SCORE_TOLERANCE)
    assert out.scores.dtype == torch.float32


def test_deploy_model_postprocessing_runs_without_autocast(monkeypatch):
    # SOLODeployModel calls the post-processor directly (not through SOLO.inference): under a
    # caller's float16 autocast, Matrix NMS still sees autocast off and float32.
    from solo_d2.deploy import SOLODeployModel
    from solo_d2.modeling import postprocessing

    f32, _ = _models("SOLOHead")
    seen = []
    inner = postprocessing._matrix_nms

    def recording(masks, labels, scores, *a):
        seen.append((torch.is_autocast_enabled("cpu"), scores.dtype))
        return inner(masks, labels, scores, *a)

    monkeypatch.setattr(postprocessing, "_matrix_nms", recording)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        masks, scores, classes, boxes = SOLODeployModel(f32)(_image())
    assert seen == [(False, torch.float32)]
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all() and len(scores) > 0
