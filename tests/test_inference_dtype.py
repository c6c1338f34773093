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
