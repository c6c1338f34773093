"""Parity with mmdetection 3.3.0 and AdelaiDet: golden fixtures made by mmdetection itself
(``benchmarks/make_parity_fixtures.py``; see its docstring for how to regenerate them), loaded here
through solo_d2's checkpoint converter, with no mmdetection installed.

Each fixture is a narrow mmdetection model (ResNet-18 with base width 8, 32-channel FPN and
head, 3 classes; SOLOv2: E = 32 and a 32-channel mask feature branch) with random weights, run on two RGB images of different sizes that pad to the
same size in one batch. solo_d2 runs the same batch; it must give the same category scores and
soft masks (within 1e-4), and the same final predictions (count, classes, scores within 1e-4,
mask IoU >= 0.99). The fixtures keep 100 candidates before Matrix NMS (mmdetection's
``nms_pre``; published: 500) out of ~320, so that the place of that top-k matters.

``AdelaiDet_SOLOv2.pth`` is the same made by AdelaiDet's own SOLOv2 (``--adelaidet-path`` of the
tool): a narrow caffe-style ResNet-50 (stem 8, bottleneck width 4, ``STRIDE_IN_1X1 True``) on
BGR images, loaded through the converter's AdelaiDet layout with the same tolerances.
"""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

import solo_d2  # noqa: F401
from solo_d2.conversion import convert_state_dict
from solo_d2.config import get_solo_cfg

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "parity")
# solo_d2's head type for each mmdetection head
HEAD_TYPES = {
    "SOLO": "SOLOHead",
    "DecoupledSOLO": "DecoupledSOLOHead",
    "DecoupledSOLOLight": "DecoupledSOLOLightHead",
    "SOLOv2": "SOLOv2Head",
}


#: fixture files: one per mmdetection head, and AdelaiDet's SOLOv2
FIXTURE_NAMES = sorted(HEAD_TYPES) + ["AdelaiDet_SOLOv2"]


def load_fixture(name):
    return torch.load(os.path.join(FIXTURES, f"{name}.pth"), weights_only=True)


def solo_cfg(fx):
    """The solo_d2 config of the fixture's mmdetection model, written out key by key."""
    c = fx["config"]
    cfg = get_solo_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SOLO"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = c["resnet_depth"]
    if c.get("source") == "adelaidet":  # Detectron2's caffe-style bottleneck ResNet
        cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = c["resnet_stem_channels"]
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = c["resnet_res2_channels"]
        cfg.MODEL.RESNETS.WIDTH_PER_GROUP = c["resnet_width_per_group"]
        cfg.MODEL.RESNETS.STRIDE_IN_1X1 = c["stride_in_1x1"]
    else:
        cfg.MODEL.BACKBONE.NAME = "build_narrow_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = c["resnet_base_channels"]
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = c["resnet_base_channels"]
        cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = c["fpn_channels"]
    cfg.INPUT.FORMAT = c["input_format"]
    cfg.MODEL.PIXEL_MEAN = list(c["pixel_mean"])
    cfg.MODEL.PIXEL_STD = list(c["pixel_std"])
    s = cfg.MODEL.SOLO
    s.HEAD_TYPE = HEAD_TYPES[fx["head"]]
    s.NUM_CLASSES = c["num_classes"]
    s.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    s.NUM_GRIDS = list(c["num_grids"])
    s.SCALE_RANGES = [list(r) for r in c["scale_ranges"]]
    s.CONV_CHANNELS = c["feat_channels"]
    s.NUM_STACKED_CONVS = c["stacked_convs"]
    s.NORM = "GN"
    if fx["head"] == "SOLOv2":
        s.MASK_FEATURE_CHANNELS = c["mask_feature_channels"]
        s.MASK_FEATURE_DIM = c["mask_feature_dim"]
        s.MASK_FEATURE_NUM_LEVELS = c["mask_feature_num_levels"]
        s.DYNAMIC_KERNEL_SIZE = c["dynamic_kernel_size"]
    t = c["test_cfg"]
    s.SCORE_THRESH_TEST = t["score_thr"]
    s.MASK_THRESH_TEST = t["mask_thr"]
    s.NMS_PRE = t["nms_pre"]
    s.NMS_KERNEL = t["kernel"]
    s.NMS_SIGMA = t["sigma"]
    s.UPDATE_THRESH_TEST = t["filter_thr"]
    s.MAX_PER_IMAGE = t["max_per_img"]
    s.CHANNELS_LAST = False
    cfg.DATASETS.TRAIN = ()
    cfg.DATASETS.TEST = ()
    return cfg


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def run(request):
    """(fixture, model, outputs of every stage) for one fixture."""
    fx = load_fixture(request.param)
    model = build_model(solo_cfg(fx)).eval()
    conv = convert_state_dict(fx["state_dict"])
    assert conv.head == fx["head"]
    assert conv.layout == fx.get("source", "mmdet")
    incompatible = model.load_state_dict(conv.state_dict, strict=False)
    # strict apart from the two non-persistent normalisation buffers
    assert not incompatible.unexpected_keys
    assert not incompatible.missing_keys
    inputs = [{"image": img} for img in fx["images"]]
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        feats = model.run_backbone(images.tensor)
        bottom_up = model.backbone.bottom_up(images.tensor)
        cate_logits, mask_feats = model.head([feats[f] for f in model.in_features])
        results = model(inputs)
    return fx, model, dict(images=images,
                           feats=feats,
                           bottom_up=bottom_up,
                           cate_logits=cate_logits,
                           mask_feats=mask_feats,
                           results=results)


def test_fixture_is_a_two_size_batch(run):
    fx, _, out = run
    sizes = [tuple(img.shape[-2:]) for img in fx["images"]]
    assert len(set(sizes)) == 2
    assert list(out["images"].tensor.shape[-2:]) == list(fx["padded_size"])


def test_fixture_exercises_the_pre_nms_top_k(run):
    """More candidates pass the score threshold than nms_pre keeps: the final predictions depend
    on where the top-k is taken (after maskness, as the reference; before the masks they differ)."""
    fx, _, _ = run
    t = fx["config"]["test_cfg"]
    for b in range(len(fx["images"])):
        n = 0
        for c in fx["cate_probs"]:
            hmax = F.max_pool2d(c[b:b + 1], 2, stride=1, padding=1)[..., :-1, :-1]
            n += int(((c[b:b + 1] * (hmax == c[b:b + 1])) > t["score_thr"]).sum())
        assert n > t["nms_pre"], f"image {b}: {n} candidates"


def test_backbone_and_fpn_match(run):
    fx, _, out = run
    assert len(fx["backbone"]) == 4 and len(fx["neck"]) == 5
    for i, ref in enumerate(fx["backbone"]):
        ours = out["bottom_up"][f"res{i + 2}"][:, :ref.shape[1]]
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    for i, ref in enumerate(fx["neck"]):
        ours = out["feats"][f"p{i + 2}"][:, :ref.shape[1]]
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_category_scores_match(run):
    fx, _, out = run
    assert len(out["cate_logits"]) == len(fx["cate_probs"])
    for ours, ref in zip(out["cate_logits"], fx["cate_probs"]):
        torch.testing.assert_close(ours.sigmoid(), ref, atol=1e-4, rtol=0)


def test_soft_masks_match(run):
    fx, model, out = run
    mask_size = model.head.mask_size(out["mask_feats"][0])
    for level, (cells, ref) in enumerate(zip(fx["cells"], fx["soft_masks"])):
        for b in range(ref.shape[0]):
            with torch.no_grad():
                # at the finest mask size, as the postprocessing asks for them
                m = model.head.mask_probs(out["mask_feats"][level],
                                          level,
                                          torch.full_like(cells, b),
                                          cells,
                                          out_size=mask_size)
            torch.testing.assert_close(m, ref[b], atol=1e-4, rtol=0)


def _unpack(p):
    shape = p["mask_shape"]
    bits = np.unpackbits(p["masks_packed"].numpy(), axis=1, count=int(np.prod(shape[1:])))
    return torch.from_numpy(bits).view(shape).bool()


def test_final_predictions_match(run):
    fx, _, out = run
    for b, (res, ref) in enumerate(zip(out["results"], fx["predictions"])):
        inst = res["instances"]
        ref_masks = _unpack(ref)
        assert len(ref["scores"]) > 0, "the fixture must have detections"
        assert len(inst) == len(ref["scores"]), f"image {b}"
        assert inst.image_size == tuple(fx["images"][b].shape[-2:])
        assert torch.equal(inst.pred_classes, ref["labels"]), f"image {b}"
        torch.testing.assert_close(inst.scores, ref["scores"], atol=1e-4, rtol=0)
        a, m = inst.pred_masks.flatten(1).float(), ref_masks.flatten(1).float()
        inter = (a * m).sum(1)
        iou = inter / (a.sum(1) + m.sum(1) - inter).clamp(min=1)
        assert iou.min() >= 0.99, f"image {b}: min mask IoU {iou.min():.4f}"
