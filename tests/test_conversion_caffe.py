"""Caffe-style sources: Detectron2's model-zoo ImageNet ResNet ``.pkl`` files (restricted
unpickling, Detectron2's Caffe2 names) through tools/convert_weights.py and MODEL.WEIGHTS, and the
backbone-style check of the converter."""
import os
import pickle

import numpy as np
import pytest
import torch

import solo_d2  # noqa: F401
from helpers import REPO, load_script, solo_test_cfg
from solo_d2.checkpoint import UNSAFE_LOAD_ENV, SafeDetectionCheckpointer, UnsafeCheckpointError

CAFFE_R50 = "configs/COCO-InstanceSegmentation/AdelaiDet/SOLOv2_R50_3x.yaml"
# the narrow bottleneck ResNet-50 of these tests: stem 8, bottleneck width 4 at res2
NARROW = ["MODEL.RESNETS.STEM_OUT_CHANNELS", "8", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
          "MODEL.RESNETS.WIDTH_PER_GROUP", "4"]


def msra_blobs(seed=0, stem=8, width=4, blocks=(3, 4, 6, 3)):
    """A Detectron2 ImageNet ResNet as its .pkl holds it: Caffe2 names, folded BN (``_bn_s``,
    ``_bn_b``, no running statistics), the stem conv's round-off bias and the classifier."""
    rng = np.random.RandomState(seed)
    blobs = {}

    def conv(name, cout, cin, k):
        blobs[name + "_w"] = rng.randn(cout, cin, k, k).astype(np.float32) * 0.1

    def bn(name, c):
        blobs[name + "_bn_s"] = (1 + 0.1 * rng.randn(c)).astype(np.float32)
        blobs[name + "_bn_b"] = (0.1 * rng.randn(c)).astype(np.float32)

    conv("conv1", stem, 3, 7)
    blobs["conv1_b"] = np.full(stem, 1e-9, np.float32)
    bn("res_conv1", stem)
    cin = stem
    for s, n in zip(range(2, 6), blocks):
        w = width * 2 ** (s - 2)
        for b in range(n):
            p = f"res{s}_{b}_"
            if b == 0:
                conv(p + "branch1", 4 * w, cin, 1)
                bn(p + "branch1", 4 * w)
            conv(p + "branch2a", w, cin if b == 0 else 4 * w, 1)
            bn(p + "branch2a", w)
            conv(p + "branch2b", w, w, 3)
            bn(p + "branch2b", w)
            conv(p + "branch2c", 4 * w, w, 1)
            bn(p + "branch2c", 4 * w)
        cin = 4 * w
    blobs["fc1000_w"] = rng.randn(1000, cin).astype(np.float32)
    blobs["fc1000_b"] = np.zeros(1000, np.float32)
    return blobs


def write_pkl(path, blobs):
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    return path


class _WritesMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def convert_weights():
    return load_script("tools/convert_weights.py")


def run_cli(tool, args, capsys):
    rc = tool.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out.strip().splitlines(), err.strip()


def test_msra_pkl_converts_to_the_backbone_detectron2_itself_loads(convert_weights, tmp_path, capsys):
    blobs = msra_blobs()
    src = write_pkl(tmp_path / "R-50.pkl", blobs)
    dst = tmp_path / "R-50_d2.pth"
    rc, lines, err = run_cli(convert_weights, [src, dst], capsys)
    assert rc == 0, err
    assert lines[-1] == CAFFE_R50  # the caffe-style config to train with
    assert "detectron2_imagenet layout" in lines[0] and "backbone only" in lines[0]
    assert any("MODEL.RESNETS.WIDTH_PER_GROUP 4" in l for l in lines)  # the narrow widths
    sd = torch.load(dst, weights_only=True)["model"]
    assert all(k.startswith("backbone.bottom_up.") for k in sd)
    bu = "backbone.bottom_up."
    assert np.array_equal(sd[bu + "res2.0.conv1.weight"].numpy(), blobs["res2_0_branch2a_w"])
    assert np.array_equal(sd[bu + "res3.0.shortcut.norm.bias"].numpy(), blobs["res3_0_branch1_bn_b"])
    assert np.array_equal(sd[bu + "stem.conv1.norm.weight"].numpy(), blobs["res_conv1_bn_s"])
    assert torch.equal(sd[bu + "res5.2.conv3.norm.running_var"], torch.ones(128))
    assert torch.equal(sd[bu + "res5.2.conv3.norm.running_mean"], torch.zeros(128))
    assert not any("fc1000" in k or "stem.conv1.bias" in k for k in sd)

    # The same backbone as Detectron2's own loading of the .pkl (its Caffe2 name matching).
    from detectron2.modeling import build_model

    cfg = solo_test_cfg(str(REPO / CAFFE_R50), NARROW)
    a, b = build_model(cfg), build_model(cfg)
    SafeDetectionCheckpointer(a, strict_heads=False).load(str(src))
    SafeDetectionCheckpointer(b, strict_heads=False).load(str(dst))
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.startswith(bu)]
    assert len(keys) == len(sd)
    assert all(torch.equal(sa[k], sb[k]) for k in keys)


def test_msra_pkl_r101_picks_the_r101_config(convert_weights, tmp_path, capsys):
    src = write_pkl(tmp_path / "R-101.pkl", msra_blobs(blocks=(3, 4, 23, 3)))
    rc, lines, err = run_cli(convert_weights, [src, tmp_path / "d.pth"], capsys)
    assert rc == 0, err
    assert lines[-1] == "configs/COCO-InstanceSegmentation/AdelaiDet/SOLOv2_R101_3x.yaml"


def test_pkl_with_code_is_refused_and_nothing_runs(convert_weights, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(UNSAFE_LOAD_ENV, raising=False)
    marker = tmp_path / "pwned"
    blobs = msra_blobs()
    blobs["res2_0_branch2a_w"] = _WritesMarker(marker)
    src = write_pkl(tmp_path / "R-50.pkl", blobs)
    dst = tmp_path / "d.pth"
    rc, lines, err = run_cli(convert_weights, [src, dst], capsys)
    assert rc == 2 and not dst.exists()
    assert "R-50.pkl" in err and "'posix.system' is not allowed" in err and "--unsafe-load" in err
    # MODEL.WEIGHTS of the same file: refused too
    from detectron2.modeling import build_model

    model = build_model(solo_test_cfg(str(REPO / CAFFE_R50), NARROW))
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        SafeDetectionCheckpointer(model, strict_heads=False).load(str(src))
    assert not marker.exists()


def test_torchvision_style_config_is_refused_for_a_caffe_style_source(convert_weights, tmp_path, capsys):
    src = write_pkl(tmp_path / "R-50.pkl", msra_blobs())
    cfg = "configs/COCO-InstanceSegmentation/SOLOv2_R50_3x.yaml"
    rc, lines, err = run_cli(convert_weights, [src, tmp_path / "d.pth", "--config-file", cfg], capsys)
    assert rc == 2
    assert "caffe-style" in err and "MODEL.RESNETS.STRIDE_IN_1X1 True" in err and cfg in err
    assert "INPUT.FORMAT BGR" in err and "INPUT.FORMAT RGB" in err  # the source's and the config's


def test_a_solo_config_trains_from_an_imagenet_pkl_without_unsafe_load(tiny_dataset, tmp_path, monkeypatch):
    from solo_d2.engine import Trainer

    monkeypatch.delenv(UNSAFE_LOAD_ENV, raising=False)
    blobs = msra_blobs()
    src = write_pkl(tmp_path / "R-50.pkl", blobs)
    # the tiny test config with the caffe-style narrow ResNet-50 of the .pkl
    cfg = solo_test_cfg(opts=NARROW + [
        "MODEL.WEIGHTS", str(src), "MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.NORM", "FrozenBN",
        "MODEL.RESNETS.STRIDE_IN_1X1", "True", "MODEL.BACKBONE.FREEZE_AT", "2",
        "MODEL.PIXEL_MEAN", "[103.53, 116.28, 123.675]", "MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]",
        "INPUT.FORMAT", "BGR", "DATASETS.TRAIN", f"('{tiny_dataset}',)", "SOLVER.MAX_ITER", "3",
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "out"),
    ])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    sd = trainer.model.state_dict()
    assert np.array_equal(sd["backbone.bottom_up.res4.5.conv2.weight"].numpy(), blobs["res4_5_branch2b_w"])
    trainer.train()
    assert trainer.iter == 3  # three iterations ran
    after = trainer.model.state_dict()
    # stem and res2 frozen (FREEZE_AT 2): still the .pkl's; the head trained
    assert np.array_equal(after["backbone.bottom_up.res2.0.conv1.weight"].numpy(), blobs["res2_0_branch2a_w"])
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------
# AdelaiDet's SOLOv2
# ---------------------------------------------------------------------------------------------
ADELAIDET_NARROW = NARROW + ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.SOLO.NUM_CLASSES", "3",
                             "MODEL.SOLO.CONV_CHANNELS", "64", "MODEL.SOLO.MASK_FEATURE_DIM", "32",
                             "MODEL.SOLO.MASK_FEATURE_CHANNELS", "32"]


def adelaidet_state_dict(seed=0):
    """A random AdelaiDet SOLOv2 state dict in its names (adet/modeling/solov2/solov2.py:
    ``ins_head.{cate,kernel}_tower.{0,3,6,9}`` convs and ``{1,4,7,10}`` GNs, ``mask_head.
    convs_all_levels.{i}.conv{j}.{0,1}``, ``mask_head.conv_pred.{0,1}``), narrow widths."""
    import re

    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    model = build_model(solo_test_cfg(str(REPO / CAFFE_R50), ADELAIDET_NARROW))
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith(("pixel_mean", "pixel_std")):
            continue
        k = re.sub(r"^head\.(cate_tower|kernel_tower|cate_pred|kernel_pred)\.", r"ins_head.\1.", k)
        k = re.sub(r"^head\.mask_feature\.levels\.(\d+)\.(\d+)\.norm\.", r"mask_head.convs_all_levels.\1.conv\2.1.", k)
        k = re.sub(r"^head\.mask_feature\.levels\.(\d+)\.(\d+)\.", r"mask_head.convs_all_levels.\1.conv\2.0.", k)
        k = re.sub(r"^head\.mask_feature\.pred\.norm\.", "mask_head.conv_pred.1.", k)
        k = re.sub(r"^head\.mask_feature\.pred\.", "mask_head.conv_pred.0.", k)
        out[k] = torch.randn_like(v) if v.is_floating_point() else v
    return out


def test_adelaidet_checkpoint_converts_to_its_caffe_style_config(convert_weights, tmp_path, capsys):
    from detectron2.modeling import build_model

    sd = adelaidet_state_dict()
    assert any(k.startswith("ins_head.kernel_tower.9.") for k in sd)
    assert "mask_head.convs_all_levels.3.conv2.1.bias" in sd and "mask_head.conv_pred.1.weight" in sd
    src = tmp_path / "SOLOv2_R50_3x.pth"
    torch.save({"model": sd, "iteration": 269999}, src)
    dst = tmp_path / "d2.pth"
    rc, lines, err = run_cli(convert_weights, [src, dst], capsys)
    assert rc == 0, err
    assert lines[-1] == CAFFE_R50
    assert "adelaidet layout, SOLOv2 head, 3 classes" in lines[0]
    opts = next(l for l in lines if "--opts" in l).split("--opts ")[1].split()
    # the printed config with the printed options builds the model the weights load into strictly
    cfg = solo_test_cfg(str(REPO / lines[-1]), opts + ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"])
    model = build_model(cfg)
    SafeDetectionCheckpointer(model).load(str(dst))
    loaded = model.state_dict()
    assert torch.equal(loaded["head.kernel_tower.0.weight"], sd["ins_head.kernel_tower.0.weight"])
    assert loaded["head.kernel_tower.0.weight"].shape[1] == 32 + 2  # the coordinate channels
    assert torch.equal(loaded["head.mask_feature.levels.3.2.norm.bias"], sd["mask_head.convs_all_levels.3.conv2.1.bias"])
    assert torch.equal(loaded["head.mask_feature.pred.weight"], sd["mask_head.conv_pred.0.weight"])
    assert torch.equal(loaded["backbone.fpn_lateral5.bias"], sd["backbone.fpn_lateral5.bias"])


def test_adelaidet_checkpoint_refuses_a_torchvision_style_config(convert_weights, tmp_path, capsys):
    src = tmp_path / "SOLOv2_R50_3x.pth"
    torch.save({"model": adelaidet_state_dict()}, src)
    cfg = "configs/COCO-InstanceSegmentation/SOLOv2_R50_3x.yaml"
    rc, lines, err = run_cli(convert_weights, [src, tmp_path / "d.pth", "--config-file", cfg], capsys)
    assert rc == 2 and not (tmp_path / "d.pth").exists()
    assert "adelaidet checkpoint is caffe-style" in err and cfg in err
    assert "MODEL.PIXEL_STD [1.0, 1.0, 1.0]" in err and "MODEL.PIXEL_STD [58.395, 57.12, 57.375]" in err


def test_adelaidet_leftover_keys_are_named(convert_weights, tmp_path, capsys):
    sd = adelaidet_state_dict()
    sd["ins_head.centerness.weight"] = torch.zeros(1)
    src = tmp_path / "x.pth"
    torch.save({"model": sd}, src)
    rc, lines, err = run_cli(convert_weights, [src, tmp_path / "d.pth"], capsys)
    assert rc == 2 and "leftover" in err and "ins_head.centerness.weight" in err
