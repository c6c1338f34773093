"""tools/convert_weights.py and solo_d2.conversion: every published layout converts
(synthetic, small source state dicts written here with mmdetection's / the official repository's
/ torchvision's key names), the output loads with weights_only=True into the right model, the
last printed line is the config, and every refusal path exits non-zero naming the problem."""
import argparse
import os
import re
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model

import solo_d2  # noqa: F401
from helpers import cpu_env, load_script
from solo_d2.checkpoint import SafeDetectionCheckpointer
from solo_d2.conversion import (
    ConvertedCheckpoint,
    config_file_for,
    convert_state_dict,
    converted_config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_weights.py")
COCO = "configs/COCO-InstanceSegmentation"

convert_weights = load_script("tools/convert_weights.py")


# ---------------------------------------------------------------------------------------------
# Synthetic source checkpoints
# ---------------------------------------------------------------------------------------------
def _t(*shape):
    return torch.randn(*shape)


def _bn(sd, name, c):
    sd[f"{name}.weight"], sd[f"{name}.bias"] = _t(c), _t(c)
    sd[f"{name}.running_mean"], sd[f"{name}.running_var"] = _t(c), torch.rand(c) + 0.5
    sd[f"{name}.num_batches_tracked"] = torch.tensor(7)


def resnet(prefix="backbone.", depth=18, base=8, dcn=False, offset_channels=18):
    """torchvision / mmdetection ResNet keys; bottleneck for depth 50 / 101 (expansion 4); ``dcn``:
    deformable 3x3 convs (``conv2.conv_offset``, 18 channels for DCN v1, 27 for DCN v2) in
    layer2-layer4, as the light DCN model and the SOLOv2 DCN models."""
    blocks = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
    bottleneck = depth >= 50
    sd = {f"{prefix}conv1.weight": _t(base, 3, 7, 7)}
    _bn(sd, f"{prefix}bn1", base)
    cin = base
    for s, n in enumerate(blocks):
        width = base * 2**s
        cout = width * 4 if bottleneck else width
        for b in range(n):
            p = f"{prefix}layer{s + 1}.{b}"
            c0 = cin if b == 0 else cout
            if bottleneck:
                shapes = [(width, c0, 1, 1), (width, width, 3, 3), (cout, width, 1, 1)]
            else:
                shapes = [(cout, c0, 3, 3), (cout, cout, 3, 3)]
            for k, shape in enumerate(shapes, 1):
                sd[f"{p}.conv{k}.weight"] = _t(*shape)
                _bn(sd, f"{p}.bn{k}", shape[0])
            if dcn and s > 0:
                sd[f"{p}.conv2.conv_offset.weight"] = _t(offset_channels, *shapes[1][1:])
                sd[f"{p}.conv2.conv_offset.bias"] = _t(offset_channels)
            if b == 0 and (s > 0 or c0 != cout):
                sd[f"{p}.downsample.0.weight"] = _t(cout, c0, 1, 1)
                _bn(sd, f"{p}.downsample.1", cout)
        cin = cout
    return sd, [base * 2**s * (4 if bottleneck else 1) for s in range(4)]


def fpn(in_channels, out=32):
    sd = {}
    for i, c in enumerate(in_channels):
        sd[f"neck.lateral_convs.{i}.conv.weight"], sd[f"neck.lateral_convs.{i}.conv.bias"] = _t(
            out, c, 1, 1), _t(out)
        sd[f"neck.fpn_convs.{i}.conv.weight"], sd[f"neck.fpn_convs.{i}.conv.bias"] = _t(
            out, out, 3, 3), _t(out)
    return sd


GRIDS = [12, 10, 8, 6, 4]


def head(kind, names="mmdet", ch=32, convs=2, classes=3, dcn=False, in_ch=32):
    """A SOLO / DecoupledSOLO / DecoupledSOLOLight head in mmdetection's or the official names."""
    n = {
        "mmdet":
        dict(prefix="mask_head.",
             cls="cls_convs",
             conv_cls="conv_cls",
             mask="mask_convs",
             list="conv_mask_list"),
        "official":
        dict(prefix="bbox_head.",
             cls="cate_convs",
             mask="ins_convs",
             list="solo_ins_list",
             conv_cls="solo_cate" if kind == "SOLO" else "dsolo_cate"),
    }[names]
    if names == "official" and kind != "SOLO":
        n["list"] = "dsolo_ins_list"
    p = n["prefix"]
    sd = {}

    def tower(name, cin):
        for i in range(convs):
            c0 = cin if i == 0 else ch
            sd[f"{p}{name}.{i}.conv.weight"] = _t(ch, c0, 3, 3)
            if dcn and i == convs - 1:
                sd[f"{p}{name}.{i}.conv.conv_offset.weight"] = _t(18, c0, 3, 3)
                sd[f"{p}{name}.{i}.conv.conv_offset.bias"] = _t(18)
            sd[f"{p}{name}.{i}.gn.weight"], sd[f"{p}{name}.{i}.gn.bias"] = _t(ch), _t(ch)

    tower(n["cls"], in_ch)
    if kind == "DecoupledSOLO":
        tower(n["mask"] + "_x", in_ch + 1)
        tower(n["mask"] + "_y", in_ch + 1)
    else:
        tower(n["mask"], in_ch + 2)
    sd[f"{p}{n['conv_cls']}.weight"], sd[f"{p}{n['conv_cls']}.bias"] = _t(classes, ch, 3,
                                                                          3), _t(classes)
    for l, s in enumerate(GRIDS):
        if kind == "SOLO":
            sd[f"{p}{n['list']}.{l}.weight"], sd[f"{p}{n['list']}.{l}.bias"] = _t(s * s, ch, 1,
                                                                                  1), _t(s * s)
        else:
            for a in "xy":
                sd[f"{p}{n['list']}_{a}.{l}.weight"], sd[f"{p}{n['list']}_{a}.{l}.bias"] = _t(
                    s, ch, 3, 3), _t(s)
    return sd


def source(kind="SOLO", names="mmdet", depth=18, backbone_dcn=False, **kw):
    bb, chans = resnet("backbone.", depth, dcn=backbone_dcn)
    return {**bb, **fpn(chans), **head(kind, names, **kw)}


def run_cli(argv, capsys):
    rc = convert_weights.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out.strip().splitlines(), out.err.strip()


def load_into_model(dst, src_sd, config):
    """Load ``dst`` with weights_only=True through SafeDetectionCheckpointer into the model of
    ``config`` with the checkpoint's sizes; return (model, state dict written)."""
    data = torch.load(dst, weights_only=True)
    assert data["__author__"] == "solo_d2 convert_weights" and data["matching_heuristics"] is False
    conv = convert_state_dict(src_sd)
    model = build_model(converted_config(conv, os.path.join(ROOT, config)))
    SafeDetectionCheckpointer(model).load(str(dst))
    for k, v in data["model"].items():
        assert torch.equal(model.state_dict()[k], v), k
    return model, data["model"]


# ---------------------------------------------------------------------------------------------
# Every layout converts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,names,dcn,config",
    [
        ("SOLO", "mmdet", False, "SOLO_R50_3x.yaml"),
        ("DecoupledSOLO", "mmdet", False, "DecoupledSOLO_R50_3x.yaml"),
        ("DecoupledSOLOLight", "mmdet", False, "DecoupledSOLO_Light_R50_3x.yaml"),
        ("DecoupledSOLOLight", "mmdet", True, "DecoupledSOLO_Light_DCN_R50_3x.yaml"),
        ("SOLO", "official", False, "SOLO_R50_3x.yaml"),
        ("DecoupledSOLO", "official", False, "DecoupledSOLO_R50_3x.yaml"),
        ("DecoupledSOLOLight", "official", False, "DecoupledSOLO_Light_R50_3x.yaml"),
        ("DecoupledSOLOLight", "official", True, "DecoupledSOLO_Light_DCN_R50_3x.yaml"),
    ],
)
def test_layout_converts_and_loads(kind, names, dcn, config, tmp_path, capsys):
    # the DCN model has deformable convs in its (bottleneck) backbone too
    sd = source(kind, names, dcn=dcn, depth=50 if dcn else 18, backbone_dcn=dcn)
    src = tmp_path / "src.pth"
    torch.save({"state_dict": sd, "meta": {"epoch": 36}}, src)
    rc, lines, err = run_cli([src, tmp_path / "dst.pth"], capsys)
    assert rc == 0, err
    assert lines[-1] == f"{COCO}/{config}"
    opts = [l for l in lines if "--opts" in l]
    assert len(opts) == 1 and "MODEL.SOLO.NUM_CLASSES 3" in opts[0]
    assert "MODEL.SOLO.NUM_GRIDS [12,10,8,6,4]" in opts[0]
    if not dcn:
        assert any("no " in l and "ResNet-18" in l for l in lines), lines
        assert "MODEL.RESNETS.DEPTH 18" in opts[0]
        assert "MODEL.BACKBONE.NAME build_narrow_resnet_fpn_backbone" in opts[0]
    _, out = load_into_model(tmp_path / "dst.pth", sd, lines[-1])
    p = "mask_head." if names == "mmdet" else "bbox_head."
    cls = "cls_convs" if names == "mmdet" else "cate_convs"
    # values land where they belong: [conv, GN, ReLU] per tower conv
    assert torch.equal(out["head.cate_tower.3.weight"], sd[f"{p}{cls}.1.conv.weight"])
    assert torch.equal(out["head.cate_tower.4.bias"], sd[f"{p}{cls}.1.gn.bias"])
    assert torch.equal(out["backbone.bottom_up.res3.0.shortcut.norm.running_var"],
                       sd["backbone.layer2.0.downsample.1.running_var"])
    assert torch.equal(out["backbone.fpn_output5.weight"], sd["neck.fpn_convs.3.conv.weight"])
    assert not any("num_batches_tracked" in k for k in out)
    if kind == "SOLO":
        lst = "conv_mask_list" if names == "mmdet" else "solo_ins_list"
        assert torch.equal(out["head.mask_preds.2.weight"], sd[f"{p}{lst}.2.weight"])
    else:
        lst = "conv_mask_list" if names == "mmdet" else "dsolo_ins_list"
        assert torch.equal(out["head.mask_preds.2.y.weight"], sd[f"{p}{lst}_y.2.weight"])
    if kind == "DecoupledSOLO":
        mask = "mask_convs" if names == "mmdet" else "ins_convs"
        assert torch.equal(out["head.mask_tower_x.0.weight"], sd[f"{p}{mask}_x.0.conv.weight"])
    if dcn:
        mask = "mask_convs" if names == "mmdet" else "ins_convs"
        assert torch.equal(out["head.mask_tower.3.conv_offset.weight"],
                           sd[f"{p}{mask}.1.conv.conv_offset.weight"])
        assert torch.equal(out["backbone.bottom_up.res4.2.conv2.conv_offset.bias"],
                           sd["backbone.layer3.2.conv2.conv_offset.bias"])
        assert "backbone.bottom_up.res2.0.conv2.conv_offset.weight" not in out


def test_r50_picks_schedule_from_file_name(tmp_path, capsys):
    sd = source("SOLO", "mmdet", depth=50, classes=80)
    src = tmp_path / "solo_r50_fpn_1x_coco_20210821.pth"
    torch.save({"state_dict": sd}, src)
    rc, lines, err = run_cli([src, tmp_path / "dst.pth"], capsys)
    assert rc == 0, err
    assert lines[-1] == f"{COCO}/SOLO_R50_1x.yaml"
    assert not any("no SOLO config" in l for l in lines)
    # only the narrow widths of this synthetic R-50 differ from the config
    opts = [l.split("--opts ")[1] for l in lines if "--opts" in l]
    assert opts == [
        "MODEL.RESNETS.STEM_OUT_CHANNELS 8 MODEL.RESNETS.RES2_OUT_CHANNELS 32 "
        "MODEL.RESNETS.WIDTH_PER_GROUP 8 MODEL.FPN.OUT_CHANNELS 32 MODEL.SOLO.NUM_GRIDS "
        "[12,10,8,6,4] MODEL.SOLO.CONV_CHANNELS 32 MODEL.SOLO.NUM_STACKED_CONVS 2"
    ], lines
    load_into_model(tmp_path / "dst.pth", sd, lines[-1])


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_resnet_backbone_only(depth, tmp_path, capsys):
    sd, _ = resnet("", depth)
    sd["fc.weight"], sd["fc.bias"] = _t(1000, 64 if depth == 18 else 256), _t(1000)
    src = tmp_path / "resnet.pth"
    torch.save(sd, src)  # torchvision ships a bare state dict
    rc, lines, err = run_cli([src, tmp_path / "dst.pth"], capsys)
    assert rc == 0, err
    assert lines[-1] == f"{COCO}/SOLO_R50_3x.yaml"
    out = torch.load(tmp_path / "dst.pth", weights_only=True)["model"]
    assert all(k.startswith("backbone.bottom_up.") for k in out)
    assert torch.equal(out["backbone.bottom_up.stem.conv1.norm.running_mean"],
                       sd["bn1.running_mean"])
    assert torch.equal(out["backbone.bottom_up.res5.1.conv2.weight"], sd["layer4.1.conv2.weight"])


def test_cli_last_line_is_the_config(tmp_path):
    """The real command line: the config is the last line of stdout, for `| tail -n1`."""
    src = tmp_path / "src.pth"
    torch.save({"state_dict": source("SOLO")}, src)
    proc = subprocess.run(
        [sys.executable, TOOL, str(src), str(tmp_path / "d.pth")],
        capture_output=True,
        env=cpu_env(),
        text=True,
        cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"{COCO}/SOLO_R50_3x.yaml"
    assert os.path.isfile(os.path.join(ROOT, proc.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------
def _refused(sd, tmp_path, capsys, *extra):
    src = tmp_path / "src.pth"
    torch.save(sd, src)
    dst = tmp_path / "dst.pth"
    rc, lines, err = run_cli([src, dst, *extra], capsys)
    assert rc != 0
    assert not dst.exists()
    assert err.startswith("convert_weights.py: error: ") and len(err.splitlines()) == 1, err
    return err


def test_refuses_unknown_layout(tmp_path, capsys):
    err = _refused({"encoder.layers.0.weight": _t(2, 2)}, tmp_path, capsys)
    assert "unknown layout" in err and "encoder.layers.0.weight" in err


def test_refuses_leftover_keys(tmp_path, capsys):
    sd = source("SOLO")
    sd["mask_head.conv_centerness.weight"] = _t(1, 32, 3, 3)
    sd["neck.fpn_convs.4.conv.weight"] = _t(32, 32, 3, 3)  # an extra P6 conv solo_d2 has not
    err = _refused({"state_dict": sd}, tmp_path, capsys)
    assert "leftover" in err and "mask_head.conv_centerness.weight" in err and "neck.fpn_convs.4.conv.weight" in err


def test_refuses_missing_keys(tmp_path, capsys):
    sd = source("DecoupledSOLO")
    del sd["mask_head.conv_mask_list_y.3.bias"]
    err = _refused({"state_dict": sd}, tmp_path, capsys)
    assert "missing" in err and "head.mask_preds.3.y.bias" in err
    sd = source("SOLO")
    del sd["backbone.layer3.1.bn2.running_var"]
    err = _refused({"state_dict": sd}, tmp_path, capsys)
    assert "missing" in err and "backbone.bottom_up.res4.1.conv2.norm.running_var" in err


def narrow_config(tmp_path, base="SOLO_R50_3x.yaml", classes=3):
    """A config of the test's narrow model (ResNet-18 base 8, 32-channel FPN and head)."""
    cfg = tmp_path / "narrow.yaml"
    cfg.write_text(
        f"_BASE_: {os.path.join(ROOT, COCO, base)}\n"
        "MODEL:\n  BACKBONE: {NAME: build_narrow_resnet_fpn_backbone}\n"
        "  RESNETS: {DEPTH: 18, STEM_OUT_CHANNELS: 8, RES2_OUT_CHANNELS: 8}\n"
        "  FPN: {OUT_CHANNELS: 32}\n"
        f"  SOLO: {{NUM_CLASSES: {classes}, NUM_GRIDS: [12, 10, 8, 6, 4], CONV_CHANNELS: 32, NUM_STACKED_CONVS: 2}}\n"
    )
    return cfg


def test_config_file_accepted_when_it_fits(tmp_path, capsys):
    """--config-file: checked against that model as it is, and printed as the last line."""
    cfg = narrow_config(tmp_path)
    src = tmp_path / "src.pth"
    torch.save({"state_dict": source("SOLO")}, src)
    rc, lines, err = run_cli([src, tmp_path / "dst.pth", "--config-file", cfg], capsys)
    assert rc == 0, err
    assert lines[-1] == str(cfg)


def test_refuses_shape_mismatch_against_config(tmp_path, capsys):
    """With --config-file the model is that config's as it is: 3 classes do not fit 80."""
    cfg = narrow_config(tmp_path, classes=80)
    err = _refused({"state_dict": source("SOLO")}, tmp_path, capsys, "--config-file", cfg)
    assert "shape mismatch" in err and "head.cate_pred.weight: checkpoint (3, 32, 3, 3) vs model (80, 32, 3, 3)" in err


def test_refuses_head_mismatch(tmp_path, capsys):
    cfg = narrow_config(tmp_path)
    err = _refused({"state_dict": source("DecoupledSOLO")}, tmp_path, capsys, "--config-file", cfg)
    assert "DecoupledSOLO R-18 checkpoint" in err and "builds SOLOHead" in err and "head.mask_tower_x" in err


def test_refuses_arbitrary_pickle_without_unsafe_load(tmp_path, capsys):
    sd = source("SOLO")
    obj = {"state_dict": sd, "meta": {"args": argparse.Namespace(lr=0.01)}}
    err = _refused(obj, tmp_path, capsys)
    assert "--unsafe-load" in err and "arbitrary unpickling" in err
    rc, lines, err = run_cli([tmp_path / "src.pth", tmp_path / "dst.pth", "--unsafe-load"], capsys)
    assert rc == 0, err
    assert lines[-1] == f"{COCO}/SOLO_R50_3x.yaml"
    torch.load(tmp_path / "dst.pth", weights_only=True)


def test_refuses_a_solo_d2_checkpoint(tmp_path, capsys):
    err = _refused({"model": {
        "backbone.bottom_up.stem.conv1.weight": _t(8, 3, 7, 7)
    }}, tmp_path, capsys)
    assert "already" in err


def test_modulated_dcn_converts_and_odd_offsets_are_refused(tmp_path, capsys):
    """A 27-channel offset conv is modulated DCN v2: it converts to DEFORM_MODULATED /
    DEFORMABLE_MODULATED and loads; an offset conv of any other width is refused by name."""
    sd = source("DecoupledSOLOLight", depth=50, dcn=True, backbone_dcn=True)
    for k in list(sd):
        if "conv_offset" in k:
            sd[k] = _t(27, *sd[k].shape[1:])
    src = tmp_path / "src.pth"
    torch.save({"state_dict": sd}, src)
    rc, lines, err = run_cli([src, tmp_path / "dst.pth"], capsys)
    assert rc == 0, err
    opts = [l for l in lines if "--opts" in l][0]
    assert "MODEL.RESNETS.DEFORM_MODULATED True" in opts and "MODEL.SOLO.DEFORMABLE_MODULATED True" in opts
    model, _ = load_into_model(tmp_path / "dst.pth", sd, lines[-1])
    assert model.head.mask_tower[3].modulated and model.backbone.bottom_up.res4[0].conv2.modulated
    sd["backbone.layer3.1.conv2.conv_offset.weight"] = _t(20, 32, 3, 3)
    (tmp_path / "refused").mkdir()
    err = _refused({"state_dict": sd}, tmp_path / "refused", capsys)
    assert "backbone.bottom_up.res4.1.conv2.conv_offset.weight has 20 output channels" in err


@pytest.mark.parametrize(
    "head_type,depth,dcn,name,config,note",
    [
        ("SOLO", 50, False, "solo_r50_fpn_3x_coco.pth", "SOLO_R50_3x.yaml", None),
        ("SOLO", 50, False, "solo_r50_fpn_1x_coco.pth", "SOLO_R50_1x.yaml", None),
        ("SOLO", 101, False, "SOLO_R101_3x.pth", "SOLO_R101_3x.yaml", None),
        ("SOLO", 152, False, "x.pth", "SOLO_R101_3x.yaml", "ResNet-152; the closest is R-101"),
        ("DecoupledSOLO", 50, False, "decoupled-solo_r50_fpn_1x_coco.pth",
         "DecoupledSOLO_R50_1x.yaml", None),
        ("DecoupledSOLO", 101, False, "DECOUPLED_SOLO_R101_3x.pth", "DecoupledSOLO_R101_3x.yaml",
         None),
        ("DecoupledSOLOLight", 50, False, "x_1x.pth", "DecoupledSOLO_Light_R50_3x.yaml", None),
        ("DecoupledSOLOLight", 101, False, "x.pth", "DecoupledSOLO_Light_R50_3x.yaml",
         "ResNet-101; the closest is R-50"),
        ("DecoupledSOLOLight", 50, True, "x.pth", "DecoupledSOLO_Light_DCN_R50_3x.yaml", None),
    ],
)
def test_config_choice(head_type, depth, dcn, name, config, note):
    conv = ConvertedCheckpoint(state_dict={},
                               layout="mmdet",
                               head=head_type,
                               depth=depth,
                               stem_channels=64,
                               res2_channels=256,
                               num_deformable_convs=int(dcn))
    path, notes = config_file_for(conv, name, root=ROOT)
    assert path == f"{COCO}/{config}"
    assert os.path.isfile(os.path.join(ROOT, path))
    if note is None:
        assert notes == []
    else:
        assert len(notes) == 1 and note in notes[0]


@pytest.mark.parametrize("head_type", ["SOLO", "DecoupledSOLO", "DecoupledSOLOLight", "SOLOv2"])
def test_real_mmdet_state_dict_with_printed_config_and_opts(head_type, tmp_path, capsys):
    """mmdetection's own state dict (from the parity fixture): the printed config plus the
    printed --opts build a model that loads the converted file strictly."""
    from solo_d2.config import get_solo_cfg

    fx = torch.load(os.path.join(ROOT, "tests", "fixtures", "parity", f"{head_type}.pth"),
                    weights_only=True)
    src = tmp_path / "mmdet.pth"
    torch.save({"state_dict": fx["state_dict"], "meta": {"mmdet_version": "3.3.0"}}, src)
    rc, lines, err = run_cli([src, tmp_path / "dst.pth"], capsys)
    assert rc == 0, err
    opts = [l.split("--opts ")[1].split() for l in lines if "--opts" in l]
    assert len(opts) == 1
    cfg = get_solo_cfg(os.path.join(ROOT, lines[-1]))
    assert any("3 classes: set DATASETS.TRAIN / DATASETS.TEST" in l for l in lines), lines
    cfg.merge_from_list(
        opts[0] +
        ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "()", "DATASETS.TEST", "()"])
    model = build_model(cfg)
    model.load_state_dict(torch.load(tmp_path / "dst.pth", weights_only=True)["model"], strict=True)
    assert type(model.head).__name__ == f"{head_type}Head"


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_resnet_features_match(arch, tmp_path, capsys):
    """torchvision's own ResNet (random weights, random BN statistics): the converted backbone of
    the published config (STRIDE_IN_1X1 False, FrozenBN) computes the same res2-res5 features."""
    import torchvision
    from solo_d2.config import get_solo_cfg

    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)(weights=None).eval()
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.normal_(1, 0.1)
            m.bias.data.normal_(0, 0.1)
    src = tmp_path / f"{arch}.pth"
    torch.save(tv.state_dict(), src)
    rc, lines, err = run_cli([src, tmp_path / "dst.pth"], capsys)
    assert rc == 0, err
    cfg = get_solo_cfg(os.path.join(ROOT, lines[-1]))
    opts = [l.split("--opts ")[1].split() for l in lines if "--opts" in l]
    # the standard memory layout, for the same convolution kernels as torchvision's
    cfg.merge_from_list((opts[0] if opts else []) + ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
                                                     "MODEL.SOLO.CHANNELS_LAST", "False"])
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    model = build_model(cfg).eval()
    SafeDetectionCheckpointer(model, strict_heads=False).load(str(tmp_path / "dst.pth"))  # backbone only
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ours = model.backbone.bottom_up(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for i in range(1, 5):
            y = getattr(tv, f"layer{i}")(y)
            torch.testing.assert_close(ours[f"res{i + 1}"], y, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# SOLOv2
# ---------------------------------------------------------------------------------------------
def head_v2(names="mmdet", ch=32, convs=2, classes=3, e=32, mf_ch=32, in_ch=32, k=1, dcn=False,
            mf_dcn=False):
    """A SOLOv2 head in mmdetection's names (``mask_head.`` with ``kernel_convs``,
    ``conv_kernel``, ``mask_feature_head.``) or the official repository's (``bbox_head.`` with
    ``kernel_convs``, ``solo_kernel``, and a top-level ``mask_feat_head.`` whose 1x1 conv is
    ``conv_pred.0``). ``dcn``: every tower conv modulated-deformable (DCN v2, 27 channels);
    ``mf_dcn``: every mask feature conv too (27 channels, 3 for the 1x1 ``conv_pred``), as the
    published R-101 DCN model (mmcv's ``ModulatedDeformConv2dPack.conv_offset``)."""
    if names == "mmdet":
        p, cls, conv_cls, conv_kernel = "mask_head.", "cls_convs", "conv_cls", "conv_kernel"
        mf, pred = "mask_head.mask_feature_head.", "conv_pred"
    else:
        p, cls, conv_cls, conv_kernel = "bbox_head.", "cate_convs", "solo_cate", "solo_kernel"
        mf, pred = "mask_feat_head.", "conv_pred.0"
    sd = {}

    def module(name, cin, cout, ksize, deform=False):
        sd[f"{name}.conv.weight"] = _t(cout, cin, ksize, ksize)
        sd[f"{name}.gn.weight"], sd[f"{name}.gn.bias"] = _t(cout), _t(cout)
        if deform:
            sd[f"{name}.conv.conv_offset.weight"] = _t(3 * ksize * ksize, cin, ksize, ksize)
            sd[f"{name}.conv.conv_offset.bias"] = _t(3 * ksize * ksize)

    for tower, cin in ((cls, in_ch), ("kernel_convs", in_ch + 2)):
        for i in range(convs):
            module(f"{p}{tower}.{i}", cin if i == 0 else ch, ch, 3)
            if dcn:
                sd[f"{p}{tower}.{i}.conv.conv_offset.weight"] = _t(27, cin if i == 0 else ch, 3, 3)
                sd[f"{p}{tower}.{i}.conv.conv_offset.bias"] = _t(27)
    sd[f"{p}{conv_cls}.weight"], sd[f"{p}{conv_cls}.bias"] = _t(classes, ch, 3, 3), _t(classes)
    sd[f"{p}{conv_kernel}.weight"], sd[f"{p}{conv_kernel}.bias"] = _t(e * k * k, ch, 3, 3), _t(e * k * k)
    for i in range(4):
        for j in range(max(i, 1)):
            cin = (in_ch + (2 if i == 3 else 0)) if j == 0 else mf_ch
            module(f"{mf}convs_all_levels.{i}.conv{j}", cin, mf_ch, 3, mf_dcn)
    module(f"{mf}{pred}", mf_ch, e, 1, mf_dcn)
    return sd


def source_v2(names="mmdet", depth=18, base=8, fpn_ch=32, backbone_dcn=False, **kw):
    bb, chans = resnet("backbone.", depth, base=base, dcn=backbone_dcn, offset_channels=27)
    return {**bb, **fpn(chans, fpn_ch), **head_v2(names, in_ch=fpn_ch, **kw)}


@pytest.mark.parametrize("names", ["mmdet", "official"])
def test_solov2_converts_and_loads(names, tmp_path, capsys):
    sd = source_v2(names, depth=50, ch=64, convs=4, e=64, mf_ch=32)
    src = tmp_path / "solov2_r50_fpn_1x_coco.pth"
    torch.save({"state_dict": sd}, src)
    rc, lines, err = run_cli([src, tmp_path / "dst.pth"], capsys)
    assert rc == 0, err
    assert lines[-1] == f"{COCO}/SOLOv2_R50_1x.yaml"
    assert "SOLOv2 head, 3 classes, grids [40, 36, 24, 16, 12] (the config's" in lines[0], lines
    opts = [l for l in lines if "--opts" in l]
    assert len(opts) == 1
    for expected in ["MODEL.SOLO.NUM_CLASSES 3", "MODEL.SOLO.CONV_CHANNELS 64",
                     "MODEL.SOLO.MASK_FEATURE_DIM 64",
                     "MODEL.SOLO.MASK_FEATURE_CHANNELS 32"]:
        assert expected in opts[0], opts
    assert "NUM_GRIDS" not in opts[0] and "DYNAMIC_KERNEL_SIZE" not in opts[0]
    assert "NUM_STACKED_CONVS" not in opts[0]
    _, out = load_into_model(tmp_path / "dst.pth", sd, lines[-1])
    p = "mask_head." if names == "mmdet" else "bbox_head."
    mf = "mask_head.mask_feature_head." if names == "mmdet" else "mask_feat_head."
    pred = "conv_pred" if names == "mmdet" else "conv_pred.0"
    kernel = "conv_kernel" if names == "mmdet" else "solo_kernel"
    assert torch.equal(out["head.kernel_tower.3.weight"], sd[f"{p}kernel_convs.1.conv.weight"])
    assert torch.equal(out["head.kernel_tower.10.bias"], sd[f"{p}kernel_convs.3.gn.bias"])
    assert torch.equal(out["head.kernel_pred.bias"], sd[f"{p}{kernel}.bias"])
    assert torch.equal(out["head.mask_feature.levels.3.2.weight"], sd[f"{mf}convs_all_levels.3.conv2.conv.weight"])
    assert torch.equal(out["head.mask_feature.levels.0.0.norm.bias"], sd[f"{mf}convs_all_levels.0.conv0.gn.bias"])
    assert torch.equal(out["head.mask_feature.pred.weight"], sd[f"{mf}{pred}.conv.weight"])
    assert torch.equal(out["head.mask_feature.pred.norm.weight"], sd[f"{mf}{pred}.gn.weight"])


def test_solov2_light_and_kernel_size(tmp_path, capsys):
    # towers of 2 convs: a light model; a 3x3 dynamic kernel (E * 9 kernel channels)
    sd = source_v2("mmdet", depth=18, ch=32, convs=2, e=32, k=3)
    src = tmp_path / "solov2-light_r18_fpn_ms-3x_coco.pth"
    torch.save({"state_dict": sd}, src)
    rc, lines, err = run_cli([src, tmp_path / "dst.pth"], capsys)
    assert rc == 0, err
    assert lines[-1] == f"{COCO}/SOLOv2_Light_R18.yaml"
    opts = [l for l in lines if "--opts" in l][0]
    assert "MODEL.SOLO.DYNAMIC_KERNEL_SIZE 3" in opts and "MODEL.SOLO.MASK_FEATURE_DIM 32" in opts
    conv = convert_state_dict(sd)
    assert (conv.head, conv.dynamic_kernel_size, conv.mask_feature_num_levels) == ("SOLOv2", 3, 4)
    load_into_model(tmp_path / "dst.pth", sd, lines[-1])


def test_solov2_refuses_mixed_dcn_and_incomplete_mask_feature(tmp_path, capsys):
    sd = source_v2(dcn=True)
    sd["mask_head.cls_convs.0.conv.conv_offset.weight"] = _t(18, 32, 3, 3)
    sd["mask_head.cls_convs.0.conv.conv_offset.bias"] = _t(18)
    err = _refused({"state_dict": sd}, tmp_path, capsys)
    assert "mixes DCN v1" in err and "DCN v2" in err
    sd = source_v2(dcn=True)
    sd["mask_head.kernel_convs.1.conv.conv_offset.weight"] = _t(20, 32, 3, 3)
    err = _refused({"state_dict": sd}, tmp_path, capsys)
    assert "head.kernel_tower.3.conv_offset.weight has 20 output channels" in err
    sd = source_v2(dcn=True, mf_dcn=True)
    del sd["mask_head.mask_feature_head.conv_pred.conv.conv_offset.weight"]
    del sd["mask_head.mask_feature_head.conv_pred.conv.conv_offset.bias"]
    err = _refused({"state_dict": sd}, tmp_path, capsys)
    assert "mask feature convs" in err and "all or none" in err
    sd = source_v2()
    del sd["mask_head.mask_feature_head.convs_all_levels.2.conv1.gn.weight"]
    err = _refused({"state_dict": sd}, tmp_path, capsys)
    assert "missing keys" in err and "head.mask_feature.levels.2.1.norm.weight" in err
    sd = source_v2()
    sd["mask_head.conv_kernel.weight"] = _t(40, 32, 3, 3)  # not E * k^2 for E = 32
    err = _refused({"state_dict": sd}, tmp_path, capsys)
    assert "head.kernel_pred.weight has 40 channels" in err


@pytest.mark.parametrize(
    "depth,convs,name,config,note",
    [
        (50, 4, "solov2_r50_fpn_1x_coco.pth", "SOLOv2_R50_1x.yaml", None),
        (50, 4, "solov2_r50_fpn_3x_coco.pth", "SOLOv2_R50_3x.yaml", None),
        (101, 4, "SOLOv2_R101_3x.pth", "SOLOv2_R101_3x.yaml", None),
        (18, 2, "SOLOv2_LIGHT_448_R18_3x.pth", "SOLOv2_Light_R18.yaml", None),
        (34, 2, "x.pth", "SOLOv2_Light_R34.yaml", None),
        (50, 2, "x_1x.pth", "SOLOv2_Light_R50.yaml", None),
        (101, 2, "x.pth", "SOLOv2_Light_R50.yaml", "ResNet-101; the closest is R-50"),
    ],
)
def test_solov2_config_choice(depth, convs, name, config, note):
    conv = ConvertedCheckpoint(state_dict={}, layout="mmdet", head="SOLOv2", depth=depth,
                               stem_channels=64, res2_channels=256, num_stacked_convs=convs)
    path, notes = config_file_for(conv, name, root=ROOT)
    assert path == f"{COCO}/{config}"
    assert os.path.isfile(os.path.join(ROOT, path))
    assert notes == [] if note is None else (len(notes) == 1 and note in notes[0])


@pytest.mark.parametrize("names", ["mmdet", "official"])
def test_solov2_r101_dcn_converts_and_loads_strictly_into_the_published_config(names, tmp_path, capsys):
    """The published R-101 DCN layout (DCN v2 in res3-res5, in every tower conv and every mask
    feature conv) at full size: its config is SOLOv2_R101_DCN_3x.yaml unchanged (no --opts), and
    the converted weights load strictly into the model that config builds."""
    from helpers import solo_test_cfg
    from solo_d2.conversion import check_against_model, config_overrides

    sd = source_v2(names, depth=101, base=64, fpn_ch=256, backbone_dcn=True, ch=512, convs=4,
                   classes=80, e=256, mf_ch=128, dcn=True, mf_dcn=True)
    conv = convert_state_dict(sd)
    assert conv.deform_stages == (False, True, True, True) and conv.deform_modulated
    assert (conv.num_deformable_convs, conv.head_deform_modulated, conv.mask_feature_deformable) == (4, True, True)
    path, notes = config_file_for(conv, "solov2_r101_dcn_fpn_3x_coco.pth", root=ROOT)
    assert path == f"{COCO}/SOLOv2_R101_DCN_3x.yaml" and notes == []
    cfg = solo_test_cfg(os.path.join(ROOT, path))
    assert config_overrides(converted_config(conv, os.path.join(ROOT, path)), cfg) == []
    model = build_model(cfg)
    check_against_model(conv.state_dict, model)
    own = {k: v for k, v in model.state_dict().items() if k.startswith(("pixel_mean", "pixel_std"))}
    model.load_state_dict({**conv.state_dict, **own}, strict=True)
    p = "mask_head." if names == "mmdet" else "bbox_head."
    mf = "mask_head.mask_feature_head." if names == "mmdet" else "mask_feat_head."
    pred = "conv_pred" if names == "mmdet" else "conv_pred.0"
    cls = "cls_convs" if names == "mmdet" else "cate_convs"
    sdm = model.state_dict()
    assert torch.equal(sdm["head.cate_tower.0.conv_offset.weight"], sd[f"{p}{cls}.0.conv.conv_offset.weight"])
    assert torch.equal(sdm["head.kernel_tower.9.conv_offset.bias"], sd[f"{p}kernel_convs.3.conv.conv_offset.bias"])
    assert torch.equal(sdm["head.mask_feature.levels.3.2.conv_offset.weight"],
                       sd[f"{mf}convs_all_levels.3.conv2.conv.conv_offset.weight"])
    assert torch.equal(sdm["head.mask_feature.pred.conv_offset.weight"], sd[f"{mf}{pred}.conv.conv_offset.weight"])
    assert torch.equal(sdm["backbone.bottom_up.res5.2.conv2.conv_offset.weight"],
                       sd["backbone.layer4.2.conv2.conv_offset.weight"])


def test_solov2_dcn_cli_names_the_dcn_config(tmp_path, capsys):
    # small widths, R-101 blocks: the CLI's last line is the DCN config; the weights load
    sd = source_v2("official", depth=101, backbone_dcn=True, ch=32, convs=4, e=32, dcn=True, mf_dcn=True)
    src = tmp_path / "SOLOv2_R101_DCN_3x.pth"
    torch.save({"state_dict": sd}, src)
    rc, lines, err = run_cli([src, tmp_path / "dst.pth"], capsys)
    assert rc == 0, err
    assert lines[-1] == f"{COCO}/SOLOv2_R101_DCN_3x.yaml"
    model, _ = load_into_model(tmp_path / "dst.pth", sd, lines[-1])
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)}])
    assert out[0]["instances"].pred_masks.shape[1:] == (64, 96)


def test_solov2_light_dcn_falls_back_to_the_light_config_with_a_note(tmp_path, capsys):
    # The official light 512 DCN model has no config of its own: the light one, the DCN keys in
    # --opts, a note saying so; the weights load.
    sd = source_v2("official", depth=50, backbone_dcn=True, ch=32, convs=2, e=32, dcn=True)
    src = tmp_path / "SOLOv2_LIGHT_512_DCN_R50_3x.pth"
    torch.save({"state_dict": sd}, src)
    rc, lines, err = run_cli([src, tmp_path / "dst.pth"], capsys)
    assert rc == 0, err
    assert lines[-1] == f"{COCO}/SOLOv2_Light_R50.yaml"
    assert any("no SOLOv2_Light_R*_DCN config" in l for l in lines + err.splitlines()), (lines, err)
    opts = [l for l in lines if "--opts" in l][0]
    for key in ["MODEL.RESNETS.DEFORM_MODULATED True", "MODEL.SOLO.NUM_DEFORMABLE_CONVS 2",
                "MODEL.SOLO.DEFORMABLE_MODULATED True"]:
        assert key in opts, opts
    assert "MASK_FEATURE_DEFORMABLE" not in opts
    load_into_model(tmp_path / "dst.pth", sd, lines[-1])


# ---------------------------------------------------------------------------------------------
# Issue 30: files that are not checkpoints, DST = SRC, the printed path and options
# ---------------------------------------------------------------------------------------------
def _not_a_checkpoint(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"state_dict": source("SOLO")}, good)
    data = good.read_bytes()
    legacy = tmp_path / "legacy.pth"
    torch.save({"state_dict": source("SOLO")}, legacy, _use_new_zipfile_serialization=False)
    files = {"empty.pth": b"", "truncated_zip.pth": data[: len(data) // 2],
             "truncated_pickle.pth": legacy.read_bytes()[:5000], "page.pth": b"<html>404 Not Found</html>"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return files


@pytest.mark.parametrize("unsafe", [False, True])
def test_empty_truncated_and_text_files_are_not_checkpoints_never_unsafe(tmp_path, capsys, unsafe):
    expect = {"empty.pth": r"not a checkpoint: empty \(0 bytes\)",
              "truncated_zip.pth": r"not a checkpoint: truncated \(\d+ bytes",
              "truncated_pickle.pth": r"not a checkpoint: truncated or corrupt \(5000 bytes",
              "page.pth": r"not a checkpoint: not a zip or pickle file \(26 bytes"}
    _not_a_checkpoint(tmp_path)
    for name, pattern in expect.items():
        rc, _, err = run_cli([tmp_path / name, tmp_path / "dst.pth"] + (["--unsafe-load"] if unsafe else []), capsys)
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert re.search(re.escape(str(tmp_path / name)) + ": " + pattern, err), err
        assert "--unsafe-load" not in err and "Traceback" not in err
    rc, _, err = run_cli([tmp_path, tmp_path / "dst.pth"], capsys)  # a folder as SRC
    assert rc == 2 and f"{tmp_path}: a folder, not a checkpoint file" in err
    assert not (tmp_path / "dst.pth").exists()


def test_well_formed_file_with_python_objects_still_suggests_unsafe_load(tmp_path, capsys):
    torch.save({"state_dict": source("SOLO"), "meta": {"args": argparse.Namespace(lr=0.01)}}, tmp_path / "m.pth")
    rc, _, err = run_cli([tmp_path / "m.pth", tmp_path / "dst.pth"], capsys)
    assert rc == 2 and "rerun with --unsafe-load" in err and "argparse.Namespace" in err


def test_dst_equal_to_src_or_a_folder_is_refused_and_the_source_kept(tmp_path, capsys):
    src = tmp_path / "src.pth"
    torch.save({"state_dict": source("SOLO")}, src)
    before = src.read_bytes()
    os.symlink(src, tmp_path / "link.pth")
    for dst in (src, tmp_path / "link.pth", tmp_path / "." / "src.pth"):
        rc, lines, err = run_cli([src, dst], capsys)
        assert rc == 2 and "would overwrite the source checkpoint" in err, err
    assert src.read_bytes() == before
    rc, _, err = run_cli([src, tmp_path], capsys)
    assert rc == 2 and f"DST {tmp_path}: a folder" in err
    rc, _, err = run_cli([src, tmp_path / "d.pth", "--config-file", tmp_path / "no.yaml"], capsys)
    assert rc == 2 and "no.yaml: no such file" in err and len(err.splitlines()) == 1


def test_printed_config_path_works_from_another_folder_and_runs_on_images(tmp_path):
    """From another folder the last line is an absolute path; the printed --opts of a 3-class
    checkpoint build a model that loads it and predicts (the COCO datasets' 80 classes are
    cleared)."""
    import shlex

    import numpy as np

    from solo_d2.predictor import SOLOPredictor

    fx = torch.load(os.path.join(ROOT, "tests", "fixtures", "parity", "SOLO.pth"), weights_only=True)
    torch.save({"state_dict": fx["state_dict"]}, tmp_path / "src.pth")
    proc = subprocess.run([sys.executable, TOOL, "src.pth", "dst.pth"], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    config = lines[-1]
    assert os.path.isabs(config) and os.path.isfile(config), config
    opts = shlex.split([l for l in lines if "--opts" in l][0].split("--opts ", 1)[1])
    assert "DATASETS.TRAIN" in opts and "DATASETS.TEST" in opts
    cfg = solo_d2.get_solo_cfg(config, opts + ["MODEL.WEIGHTS", str(tmp_path / "dst.pth"), "MODEL.DEVICE", "cpu",
                                               "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"])
    out = SOLOPredictor(cfg)(np.zeros((48, 64, 3), np.uint8))["instances"]
    assert out.image_size == (48, 64)


def test_groupnorm_channel_mismatch_names_the_keys(tmp_path, capsys):
    sd = source("SOLO", ch=5)
    err = _refused({"state_dict": sd}, tmp_path, capsys)
    assert "MODEL.SOLO.CONV_CHANNELS = 5" in err and "divisible by 32" in err, err
    assert "head.cate_tower.1.weight (5,)" in err, err  # the tower's first GroupNorm
