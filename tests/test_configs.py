"""Every shipped config loads on top of add_solo_config and builds the model it describes."""
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import solo_d2
from helpers import REPO, cpu_env, solo_test_cfg

CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml"))


def _load(path):
    return solo_test_cfg(str(REPO / path))


def test_all_configs_are_listed():
    names = {Path(c).name for c in CONFIGS}
    for expected in [
        "Base-SOLO.yaml", "SOLO_R50_1x.yaml", "SOLO_R50_3x.yaml", "SOLO_R101_3x.yaml",
        "DecoupledSOLO_R50_1x.yaml", "DecoupledSOLO_R50_3x.yaml", "DecoupledSOLO_R101_3x.yaml",
        "DecoupledSOLO_Light_R50_3x.yaml", "DecoupledSOLO_Light_DCN_R50_3x.yaml",
        "SOLOv2_R50_1x.yaml", "SOLOv2_R50_3x.yaml", "SOLOv2_R101_3x.yaml", "SOLOv2_R101_DCN_3x.yaml",
        "SOLOv2_Light_R18.yaml", "SOLOv2_Light_R34.yaml", "SOLOv2_Light_R50.yaml",
        "SOLOv2_R18_shapes.yaml",
    ]:
        assert expected in names


@pytest.mark.parametrize("path", CONFIGS)
def test_config_builds(path):
    cfg = _load(path)
    model = build_model(cfg)
    assert type(model).__name__ == "SOLO"
    assert type(model.head).__name__ == cfg.MODEL.SOLO.HEAD_TYPE
    assert len(model.head.num_grids) == len(cfg.MODEL.SOLO.IN_FEATURES)


def test_reference_defaults():
    cfg = _load("configs/COCO-InstanceSegmentation/SOLO_R50_1x.yaml")
    s = cfg.MODEL.SOLO
    assert s.NUM_GRIDS == [40, 36, 24, 16, 12] and s.NUM_STACKED_CONVS == 7 and s.CONV_CHANNELS == 256
    assert s.SCALE_RANGES == [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]]
    assert (s.SIGMA, s.LOSS_MASK_WEIGHT, s.FOCAL_LOSS_ALPHA, s.FOCAL_LOSS_GAMMA) == (0.2, 3.0, 0.25, 2.0)
    assert (s.SCORE_THRESH_TEST, s.MASK_THRESH_TEST, s.NMS_PRE, s.NMS_SIGMA) == (0.1, 0.5, 500, 2.0)
    assert (s.UPDATE_THRESH_TEST, s.MAX_PER_IMAGE, s.NMS_KERNEL) == (0.05, 100, "gaussian")
    assert cfg.SOLVER.CLIP_GRADIENTS_FULL_MODEL_NORM == 35.0 and cfg.SOLVER.BASE_LR == 0.01
    assert cfg.INPUT.MASK_FORMAT == "bitmask" and cfg.MODEL.MASK_ON
    assert cfg.SOLVER.OPTIMIZER == "SGD" and (s.PRIOR_PROB, s.MASK_PRIOR_PROB) == (0.01, 0.0)
    light = _load("configs/COCO-InstanceSegmentation/DecoupledSOLO_Light_DCN_R50_3x.yaml")
    assert light.MODEL.SOLO.NUM_STACKED_CONVS == 4 and light.MODEL.SOLO.NUM_DEFORMABLE_CONVS == 1
    assert light.INPUT.MIN_SIZE_TEST == 512 and light.INPUT.MAX_SIZE_TEST == 852
    assert light.MODEL.SOLO.SCALE_RANGES[0] == [1, 64]


def test_add_solo_config_is_idempotent_and_local():
    cfg = get_cfg()
    solo_d2.add_solo_config(cfg)
    cfg.MODEL.SOLO.NUM_CLASSES = 3
    solo_d2.add_solo_config(cfg)
    assert cfg.MODEL.SOLO.NUM_CLASSES == 3
    assert "SOLO" not in get_cfg().MODEL  # Detectron2's global defaults are untouched


@pytest.mark.slow
def test_flop_count_traces_the_model():
    # Detectron2's FlopCountAnalysis traces the model with the JIT tracer (also what export
    # tools do): the whole inference path, postprocess included, must be traceable.
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "analyze_model.py"), "--config-file",
         str(REPO / "configs" / "tests" / "SOLO_tiny.yaml"), "--size", "128", "128",
         "--num-inputs", "1", "--tasks", "flop"],
        capture_output=True, text=True, timeout=300, env=cpu_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "GFLOPs at 128x128" in proc.stdout


def test_published_configs_use_torchvision_style_inputs():
    # The published models: torchvision ResNets (stride in the 3x3 conv), RGB input normalised
    # with torchvision's ImageNet statistics, a converted torchvision checkpoint (never a URL).
    published = [c for c in CONFIGS if "COCO-InstanceSegmentation" in c and "AdelaiDet" not in c]
    assert len(published) == 16  # the base and one per published model (8 SOLO, 7 SOLOv2)
    for path in published:
        cfg = _load(path)
        assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False and cfg.INPUT.FORMAT == "RGB", path
        assert cfg.MODEL.PIXEL_MEAN == [123.675, 116.28, 103.53], path
        assert cfg.MODEL.PIXEL_STD == [58.395, 57.12, 57.375], path
        assert cfg.MODEL.WEIGHTS.startswith("output/torchvision_R-") and "://" not in cfg.MODEL.WEIGHTS, path
        assert cfg.MODEL.BACKBONE.FREEZE_AT == 2 and cfg.MODEL.RESNETS.NORM == "FrozenBN", path
    heads = {Path(p).stem: _load(p).MODEL.SOLO.HEAD_TYPE for p in published}
    assert heads["DecoupledSOLO_R50_1x"] == heads["DecoupledSOLO_R101_3x"] == "DecoupledSOLOHead"
    assert heads["DecoupledSOLO_Light_DCN_R50_3x"] == "DecoupledSOLOLightHead"
    assert _load("configs/COCO-InstanceSegmentation/SOLO_R101_3x.yaml").MODEL.RESNETS.DEPTH == 101


def test_solov2_configs_are_the_published_ones():
    # The official repository's configs/solov2/*.py and mmdetection 3.3.0's configs/solov2/*.py.
    def solo(name):
        return _load(f"configs/COCO-InstanceSegmentation/{name}.yaml")

    for name in ["SOLOv2_R50_1x", "SOLOv2_R50_3x", "SOLOv2_R101_3x", "SOLOv2_R101_DCN_3x"]:
        cfg = solo(name)
        s = cfg.MODEL.SOLO
        assert s.HEAD_TYPE == "SOLOv2Head" and (s.CONV_CHANNELS, s.NUM_STACKED_CONVS) == (512, 4), name
        assert (s.MASK_FEATURE_DIM, s.MASK_FEATURE_CHANNELS, s.DYNAMIC_KERNEL_SIZE) == (256, 128, 1), name
        assert s.SCALE_RANGES == [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]], name
        assert s.NUM_GRIDS == [40, 36, 24, 16, 12] and cfg.INPUT.MIN_SIZE_TEST == 800, name
    assert solo("SOLOv2_R50_1x").INPUT.MIN_SIZE_TRAIN == (800,)
    assert solo("SOLOv2_R50_3x").INPUT.MIN_SIZE_TRAIN == (640, 672, 704, 736, 768, 800)
    assert solo("SOLOv2_R101_3x").MODEL.RESNETS.DEPTH == 101
    # R-101 DCN: DCN v2 in res3-res5 (stage_with_dcn=(False, True, True, True)), in every conv of
    # both towers (official use_dcn_in_tower, mmdetection dcn_apply_to_all_conv=True) and in every
    # conv of the mask feature branch (its conv_cfg=dict(type='DCNv2')); otherwise SOLOv2_R101_3x.
    dcn, plain = solo("SOLOv2_R101_DCN_3x"), solo("SOLOv2_R101_3x")
    r, s = dcn.MODEL.RESNETS, dcn.MODEL.SOLO
    assert r.DEPTH == 101 and dcn.MODEL.BACKBONE.NAME == "build_solo_resnet_fpn_backbone"
    assert (r.DEFORM_ON_PER_STAGE, r.DEFORM_MODULATED, r.DEFORM_NUM_GROUPS) == ([False, True, True, True], True, 1)
    assert (s.NUM_DEFORMABLE_CONVS, s.DEFORMABLE_MODULATED, s.MASK_FEATURE_DEFORMABLE) == (4, True, True)
    assert plain.MODEL.SOLO.NUM_DEFORMABLE_CONVS == 0 and not plain.MODEL.SOLO.MASK_FEATURE_DEFORMABLE
    assert (dcn.INPUT.MIN_SIZE_TRAIN, dcn.SOLVER.MAX_ITER) == (plain.INPUT.MIN_SIZE_TRAIN, plain.SOLVER.MAX_ITER)
    for name, depth in [("SOLOv2_Light_R18", 18), ("SOLOv2_Light_R34", 34), ("SOLOv2_Light_R50", 50)]:
        cfg = solo(name)
        s = cfg.MODEL.SOLO
        assert cfg.MODEL.RESNETS.DEPTH == depth, name
        assert (s.CONV_CHANNELS, s.NUM_STACKED_CONVS, s.MASK_FEATURE_DIM, s.MASK_FEATURE_CHANNELS) == (256, 2, 128, 128), name
        assert s.SCALE_RANGES == [[1, 56], [28, 112], [56, 224], [112, 448], [224, 896]], name
        assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, cfg.INPUT.MAX_SIZE_TRAIN) == (448, 768, 768), name
        assert cfg.INPUT.MIN_SIZE_TRAIN == (352, 384, 416, 448, 480, 512), name


def test_fpn_matches_the_reference_fpn():
    # mmdetection's FPN (start_level 0, num_outs 5, add_extra_convs False): 1x1 laterals, top-down
    # sum with *nearest* upsampling to the lower level's size, 3x3 output convs, and
    # P6 = max_pool2d(P5, kernel 1, stride 2). Detectron2's FPN upsamples by scale_factor 2 and
    # its LastLevelMaxPool is the same max-pool: on inputs padded to a multiple of 32 the two
    # are the same function.
    import torch
    import torch.nn.functional as F
    from detectron2.modeling import build_backbone

    from helpers import tiny_cfg

    cfg = tiny_cfg()
    cfg.MODEL.FPN.NORM = ""
    torch.manual_seed(0)
    backbone = build_backbone(cfg).eval()
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        ours = backbone(x)
        c = backbone.bottom_up(x)
        lat = [getattr(backbone, f"fpn_lateral{i}")(c[f"res{i}"]) for i in (2, 3, 4, 5)]
        for i in (3, 2, 1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
        ref = [getattr(backbone, f"fpn_output{i}")(lat[i - 2]) for i in (2, 3, 4, 5)]
        ref.append(F.max_pool2d(ref[-1], 1, stride=2))
    for k, r in zip(("p2", "p3", "p4", "p5", "p6"), ref):
        assert ours[k].shape == r.shape
        assert torch.allclose(ours[k], r, atol=1e-6), k


def test_deformable_backbone_places_dcn_as_the_reference_and_starts_as_the_plain_one():
    import torch
    from detectron2.modeling import build_backbone

    from solo_d2.modeling.layers import DeformConv3x3

    cfg = _load("configs/COCO-InstanceSegmentation/DecoupledSOLO_Light_DCN_R50_3x.yaml")
    torch.manual_seed(0)
    dcn = build_backbone(cfg).eval()
    bottom_up = dcn.bottom_up
    assert not any(isinstance(b.conv2, DeformConv3x3) for b in bottom_up.res2)
    for k in (3, 4, 5):
        assert all(isinstance(b.conv2, DeformConv3x3) for b in getattr(bottom_up, f"res{k}"))
    assert bottom_up.res3[0].conv2.stride == 2 and bottom_up.res3[1].conv2.stride == 1
    sd = dcn.state_dict()
    assert "bottom_up.res3.0.conv2.conv_offset.weight" in sd and "bottom_up.res3.0.conv2.norm.weight" in sd
    # Offsets start at zero: the same weights in a plain backbone give the same features.
    plain_cfg = cfg.clone()
    plain_cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False] * 4
    plain = build_backbone(plain_cfg).eval()
    plain.load_state_dict({k: v for k, v in sd.items() if "conv_offset" not in k}, strict=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = dcn(x), plain(x)
    assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4) for k in a)


def test_solov2_r101_dcn_model_has_dcn_v2_where_the_reference_has():
    from solo_d2.modeling.layers import DeformConv, DeformConv3x3

    model = build_model(_load("configs/COCO-InstanceSegmentation/SOLOv2_R101_DCN_3x.yaml"))
    bottom_up, head = model.backbone.bottom_up, model.head
    assert not any(isinstance(b.conv2, DeformConv) for b in bottom_up.res2)
    for k in (3, 4, 5):
        for b in getattr(bottom_up, f"res{k}"):
            assert isinstance(b.conv2, DeformConv3x3) and b.conv2.modulated
            assert b.conv2.conv_offset.out_channels == 27
    for t in (head.cate_tower, head.kernel_tower):
        convs = [m for m in t if not isinstance(m, (torch.nn.ReLU, torch.nn.GroupNorm))]
        assert len(convs) == 4 and all(isinstance(c, DeformConv3x3) and c.modulated for c in convs)
    mf = head.mask_feature.convs()
    assert len(mf) == 1 + 1 + 2 + 3 + 1 and all(isinstance(c, DeformConv) and c.modulated for c in mf)
    assert head.mask_feature.pred.kernel_size == 1 and head.mask_feature.pred.conv_offset.out_channels == 3
    # deformable layers start with zero offsets
    assert all(not m.conv_offset.weight.any() for m in model.modules() if isinstance(m, DeformConv))


def test_small_data_config_crops_and_jitters_in_the_training_mapper():
    # The small-data recipe is Detectron2's own augmentation: the training mapper crops first
    # (a relative window of 50-100% per side), then resizes to one of five short sides.
    from detectron2.data import transforms as T

    from solo_d2.data.mapper import FileNamingDatasetMapper

    cfg = _load("configs/Shapes/DecoupledSOLO_R18_small_data.yaml")
    augs = FileNamingDatasetMapper(cfg, True).augmentations.augs
    assert isinstance(augs[0], T.RandomCrop)
    assert (augs[0].crop_type, tuple(augs[0].crop_size)) == ("relative_range", (0.5, 0.5))
    resize = next(a for a in augs if isinstance(a, T.ResizeShortestEdge))
    assert tuple(resize.short_edge_length) == (192, 224, 256, 288, 320) and resize.max_size == 320
    assert resize.is_range is False
    test_augs = FileNamingDatasetMapper(cfg, False).augmentations.augs
    assert not any(isinstance(a, T.RandomCrop) for a in test_augs)


def test_adelaidet_configs_are_caffe_style():
    # AdelaiDet's SOLOv2 models: Detectron2's MSRA ResNets (stride in the 1x1 conv), BGR input
    # with the MSRA means and no std scaling, trained from Detectron2's ImageNet .pkl files.
    adelaidet = [c for c in CONFIGS if "AdelaiDet" in c]
    assert sorted(Path(c).name for c in adelaidet) == [
        "Base-SOLOv2-AdelaiDet.yaml", "SOLOv2_R101_3x.yaml", "SOLOv2_R50_3x.yaml"]
    for path in adelaidet:
        cfg = _load(path)
        assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is True and cfg.INPUT.FORMAT == "BGR", path
        assert cfg.MODEL.PIXEL_MEAN == [103.530, 116.280, 123.675] and cfg.MODEL.PIXEL_STD == [1.0, 1.0, 1.0], path
        assert cfg.MODEL.WEIGHTS.startswith("detectron2://ImageNetPretrained/MSRA/R-"), path
        assert cfg.MODEL.SOLO.HEAD_TYPE == "SOLOv2Head" and cfg.MODEL.SOLO.CONV_CHANNELS == 512, path
    assert _load("configs/COCO-InstanceSegmentation/AdelaiDet/SOLOv2_R101_3x.yaml").MODEL.RESNETS.DEPTH == 101
