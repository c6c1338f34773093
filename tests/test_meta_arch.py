"""The SOLO meta-architecture end to end on CPU: training steps on odd inputs, the inference
contract, config errors, DefaultPredictor and Visualizer."""
import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances
from detectron2.utils.visualizer import Visualizer

from helpers import instances, tiny_cfg

HEADS = ["SOLOHead", "DecoupledSOLOHead", "SOLOv2Head"]


@pytest.fixture(scope="module", params=HEADS)
def model(request):
    torch.manual_seed(0)
    return build_model(tiny_cfg(request.param))


def _image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def _train_step(model, batch):
    model.train()
    model.zero_grad()
    losses = model(batch)
    assert set(losses) == {"loss_cate", "loss_mask"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    return {k: v.item() for k, v in losses.items()}


def _empty(h, w):
    inst = Instances((h, w))
    inst.gt_masks = BitMasks(torch.zeros(0, h, w, dtype=torch.bool))
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
    inst.gt_classes = torch.zeros(0, dtype=torch.int64)
    return inst


def test_train_step_odd_sizes(model):
    batch = [
        {"image": _image(200, 249), "instances": instances(200, 249, [(10, 20, 90, 110, 1), (150, 100, 249, 200, 3)])},
        {"image": _image(97, 131, 1), "instances": instances(97, 131, [(0, 0, 40, 30, 0)])},
    ]
    losses = _train_step(model, batch)
    assert losses["loss_mask"] > 0 and losses["loss_cate"] > 0


def test_no_positive_cell_in_batch(model):
    batch = [{"image": _image(128, 128), "instances": _empty(128, 128)} for _ in range(2)]
    losses = _train_step(model, batch)
    assert losses["loss_cate"] > 0
    assert losses["loss_mask"] == 0.0


def test_half_empty_batch(model):
    batch = [
        {"image": _image(128, 128), "instances": _empty(128, 128)},
        {"image": _image(128, 128, 1), "instances": instances(128, 128, [(30, 30, 80, 90, 2)])},
    ]
    losses = _train_step(model, batch)
    assert losses["loss_mask"] > 0


def test_zero_area_border_tiny_and_many_objects(model):
    border = instances(128, 128, [(0, 0, 128, 10, 1), (118, 40, 128, 128, 2), (60, 60, 62, 62, 0)])
    zero = instances(128, 128, [(20, 20, 60, 60, 1)])
    zero.gt_masks.tensor[0] = False  # zero-area mask, box kept
    g = torch.Generator().manual_seed(0)
    boxes = []
    for _ in range(120):
        x0, y0 = torch.randint(0, 110, (2,), generator=g).tolist()
        boxes.append((x0, y0, x0 + 8 + int(torch.randint(0, 40, (1,), generator=g)), y0 + 12, 3))
    many = instances(160, 160, [(min(a, 159), b, min(c, 160), d, k) for a, b, c, d, k in boxes])
    batch = [
        {"image": _image(128, 128), "instances": border},
        {"image": _image(128, 128, 1), "instances": zero},
        {"image": _image(160, 160, 2), "instances": many},
    ]
    _train_step(model, batch)


def test_wrong_class_id_names_the_key(model):
    batch = [{"image": _image(64, 64), "instances": instances(64, 64, [(0, 0, 30, 30, 9)])}]
    model.train()
    with pytest.raises(ValueError, match="MODEL.SOLO.NUM_CLASSES"):
        model(batch)


def test_inference_contract(model):
    model.eval()
    with torch.no_grad():
        out = model([
            {"image": _image(200, 249)},                              # no height/width
            {"image": _image(100, 120, 1), "height": 300, "width": 360},  # requested size
        ])
    assert len(out) == 2
    for r, size in zip(out, [(200, 249), (300, 360)]):
        inst = r["instances"]
        assert inst.image_size == size
        assert inst.pred_masks.shape[1:] == size and inst.pred_masks.dtype == torch.bool
        assert inst.scores.dtype == torch.float32 and inst.pred_classes.dtype == torch.int64
        assert inst.pred_boxes.tensor.shape == (len(inst), 4)


def test_inference_returns_instances_when_forced(model):
    # A lowered score threshold makes the untrained model return candidates: exercise the
    # non-empty path (masks, boxes from masks, sorted scores, max per image).
    pp = model.postprocess
    saved = (pp.score_thresh, pp.mask_thresh, pp.update_thresh, pp.max_per_image)
    pp.score_thresh, pp.mask_thresh, pp.update_thresh, pp.max_per_image = 0.0, 0.0, 0.0, 7
    try:
        model.eval()
        with torch.no_grad():
            inst = model([{"image": _image(96, 80), "height": 48, "width": 40}])[0]["instances"]
    finally:
        pp.score_thresh, pp.mask_thresh, pp.update_thresh, pp.max_per_image = saved
    assert 0 < len(inst) <= 7 and inst.pred_masks.shape[1:] == (48, 40)
    assert (inst.scores[:-1] >= inst.scores[1:]).all()
    assert (inst.pred_classes >= 0).all() and (inst.pred_classes < 4).all()


def test_bad_image_names_the_problem(model):
    model.eval()
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        model([{"image": torch.zeros(1, 32, 32)}])
    with pytest.raises(ValueError, match="empty"):
        model([{"image": torch.zeros(3, 0, 32)}])


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("MODEL.SOLO.NUM_GRIDS", [12, 10, 8, 6], "MODEL.SOLO.NUM_GRIDS"),
        ("MODEL.SOLO.SCALE_RANGES", [[1, 24], [12, 48]], "MODEL.SOLO.SCALE_RANGES"),
        ("MODEL.SOLO.IN_FEATURES", ["p2", "p3", "p4", "p5", "p7"], "MODEL.SOLO.IN_FEATURES"),
    ],
)
def test_config_length_mismatch_fails_at_build(key, value, match):
    cfg = tiny_cfg()
    cfg.merge_from_list([key, value])
    with pytest.raises(ValueError, match=match):
        build_model(cfg)


@pytest.mark.parametrize("gamma", [0.5, 0.99, -1.0])
def test_focal_gamma_between_0_and_1_fails_at_build(gamma):
    # fvcore's focal loss has a NaN gradient at a certain prediction for 0 < gamma < 1 (the
    # shapes demo hit it with 0.5 after 136 iterations); 0 and >= 1 are fine.
    cfg = tiny_cfg()
    cfg.MODEL.SOLO.FOCAL_LOSS_GAMMA = gamma
    with pytest.raises(ValueError, match=f"MODEL.SOLO.FOCAL_LOSS_GAMMA = {gamma}: must be 0 or >= 1"):
        build_model(cfg)
    for ok in (0.0, 1.0):
        cfg.MODEL.SOLO.FOCAL_LOSS_GAMMA = ok
        build_model(cfg)


def test_focal_gamma_below_1_has_nan_gradient_at_a_certain_prediction():
    # Why the check above exists (and why 0 and 1 are allowed).
    from fvcore.nn import sigmoid_focal_loss

    for gamma, finite in ((0.0, True), (0.5, False), (1.0, True), (2.0, True)):
        x = torch.tensor([-20.0, 20.0], requires_grad=True)  # certain: p = 0 and p = 1 in float32
        sigmoid_focal_loss(x, torch.tensor([0.0, 1.0]), gamma=gamma, reduction="sum").backward()
        assert bool(torch.isfinite(x.grad).all()) == finite, (gamma, x.grad)


def test_num_classes_disagreeing_with_dataset_fails_at_build():
    MetadataCatalog.get("solo_test_three_classes").set(thing_classes=["a", "b", "c"])
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = ("solo_test_three_classes",)
    with pytest.raises(ValueError, match="MODEL.SOLO.NUM_CLASSES = 4 .* 3 classes"):
        build_model(cfg)


def test_default_predictor_and_visualizer(tmp_path):
    cfg = tiny_cfg()
    cfg.MODEL.SOLO.SCORE_THRESH_TEST = 0.0  # untrained: make sure something is drawn
    cfg.MODEL.SOLO.UPDATE_THRESH_TEST = 0.0
    cfg.MODEL.SOLO.MASK_THRESH_TEST = 0.0
    cfg.MODEL.SOLO.MAX_PER_IMAGE = 3
    cfg.DATASETS.TEST = ("shapes_val",)
    predictor = DefaultPredictor(cfg)
    img = np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    out = predictor(img)["instances"]
    assert out.image_size == (90, 150) and out.pred_masks.shape == (len(out), 90, 150)
    assert 0 < len(out) <= 3
    vis = Visualizer(img[:, :, ::-1], MetadataCatalog.get("shapes_val"))
    drawn = vis.draw_instance_predictions(out.to("cpu")).get_image()
    assert drawn.shape == (90, 150, 3)


def test_every_head_selects_the_same_cells():
    batch = [
        {"image": _image(128, 128), "instances": instances(128, 128, [(10, 20, 90, 110, 1), (60, 60, 100, 80, 2)])},
        {"image": _image(128, 128, 1), "instances": instances(128, 128, [(0, 0, 40, 30, 0)])},
    ]
    selected = {}
    for head_type in HEADS:
        model = build_model(tiny_cfg(head_type))
        calls = []
        original = model.head.mask_probs

        def spy(feat, level, img, cell, original=original, calls=calls):
            calls.append((level, img.tolist(), cell.tolist()))
            return original(feat, level, img, cell)

        model.head.mask_probs = spy
        model.train()
        model(batch)
        selected[head_type] = calls
    assert all(selected[h] == selected["SOLOHead"] for h in HEADS)
    assert sum(len(c[2]) for c in selected["SOLOHead"]) > 0


@pytest.mark.parametrize("head", HEADS)
def test_channels_last_head_equals_the_standard_layout(head):
    # MODEL.SOLO.CHANNELS_LAST runs the backbone and the head's convolutions channels-last; the
    # head still returns standard-layout tensors, equal to the standard layout's up to rounding.
    torch.manual_seed(0)
    cl = build_model(tiny_cfg(head, **{"MODEL.SOLO.CHANNELS_LAST": "True"})).eval()
    std = build_model(tiny_cfg(head, **{"MODEL.SOLO.CHANNELS_LAST": "False"})).eval()
    std.load_state_dict(cl.state_dict())
    assert cl.head.cate_pred.weight.is_contiguous(memory_format=torch.channels_last)
    assert std.head.cate_pred.weight.is_contiguous()
    outputs = []
    with torch.no_grad():
        for m in (cl, std):
            images = m.preprocess_image([{"image": _image(96, 128)}])
            feats = m.run_backbone(images.tensor)
            cate, mask_feats = m.head([feats[f] for f in m.in_features])
            outputs.append(list(cate) + [t for f in mask_feats for t in m.head.mask_feat_tensors(f)])
    for a, b in zip(*outputs):
        assert a.is_contiguous() and a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_channels_last_is_applied_where_it_pays():
    # One rule (channels_last_pays): the key on the CPU; on CUDA not with GroupNorm heads.
    from solo_d2.modeling.meta_arch import channels_last_pays

    assert channels_last_pays(True, "cpu", "GN") and channels_last_pays(True, "cpu", "")
    assert not channels_last_pays(True, "cuda", "GN") and not channels_last_pays(True, "cuda:0", "GN")
    assert channels_last_pays(True, "cuda", "BN") and channels_last_pays(True, "cuda", "")
    assert not channels_last_pays(False, "cpu", "GN") and not channels_last_pays(False, "cuda", "BN")
    # The model applies the decision (on the CPU: the key).
    on = build_model(tiny_cfg("SOLOHead", **{"MODEL.SOLO.CHANNELS_LAST": "True"}))
    assert on.channels_last
    assert on.head.cate_pred.weight.is_contiguous(memory_format=torch.channels_last)
    cfg = tiny_cfg("SOLOHead", **{"MODEL.SOLO.CHANNELS_LAST": "True"})
    cfg.MODEL.DEVICE = "cuda"  # from_config's decision only (building would need CUDA)
    from solo_d2.modeling import SOLO

    with torch.device("cpu"):
        args = SOLO.from_config(cfg)
    assert args["channels_last"] is False


def test_polygon_and_bitmask_gt_give_the_same_training_losses():
    # Detectron2's default MASK_FORMAT is polygon (PolygonMasks stay on the host when the
    # instances move to the model's device); bitmask is what Base-SOLO.yaml sets.
    from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

    torch.manual_seed(0)
    model = build_model(tiny_cfg("SOLOHead")).train()
    polys = PolygonMasks([[[10.0, 10.0, 60.0, 10.0, 60.0, 60.0, 10.0, 60.0]],
                          [[70.0, 30.0, 120.0, 30.0, 95.0, 110.0]]])
    image = torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8)
    losses = []
    for masks in (polys, BitMasks.from_polygon_masks(polys, 128, 128)):
        inst = Instances((128, 128), gt_masks=masks, gt_classes=torch.tensor([1, 2]),
                         gt_boxes=Boxes(polys.get_bounding_boxes().tensor))
        losses.append(model([{"image": image, "instances": inst}]))
    assert losses[0]["loss_mask"] > 0
    for k in losses[0]:
        assert torch.equal(losses[0][k], losses[1][k]), k
