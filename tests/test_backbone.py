"""The narrow ResNet-18/34-FPN backbone: Detectron2's at width 64, any width otherwise."""
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

from solo_d2 import get_solo_cfg


def r18_cfg(width=64, norm="GN"):
    cfg = get_solo_cfg(device_fallback=False)
    cfg.MODEL.BACKBONE.NAME = "build_narrow_resnet_fpn_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = width
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = width
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.FPN.NORM = norm
    return cfg


def test_width_64_is_detectron2s_resnet18_fpn():
    cfg = r18_cfg(64)
    ours = build_backbone(cfg)
    theirs = build_resnet_fpn_backbone(cfg, ShapeSpec(channels=3))
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert list(a) == ["p2", "p3", "p4", "p5", "p6"]
    for k in a:
        assert torch.equal(a[k], b[k])


def test_narrow_width_shapes():
    backbone = build_backbone(r18_cfg(32))
    res = backbone.bottom_up
    assert [res._out_feature_channels[f"res{i}"] for i in (2, 3, 4, 5)] == [32, 64, 128, 256]
    out = backbone(torch.zeros(2, 3, 128, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p2": (2, 64, 32, 24), "p3": (2, 64, 16, 12), "p4": (2, 64, 8, 6),
        "p5": (2, 64, 4, 3), "p6": (2, 64, 2, 2),
    }
    n_narrow = sum(p.numel() for p in res.parameters())
    n_full = sum(p.numel() for p in build_backbone(r18_cfg(64)).bottom_up.parameters())
    assert n_narrow < 0.3 * n_full  # convs have 1/4 of the weights


@pytest.mark.parametrize("key, value, match", [
    ("DEPTH", 50, "MODEL.RESNETS.DEPTH = 50"),
    ("RES2_OUT_CHANNELS", 0, "MODEL.RESNETS.RES2_OUT_CHANNELS = 0"),
])
def test_bad_keys_are_named(key, value, match):
    cfg = r18_cfg(32)
    cfg.MODEL.RESNETS[key] = value
    with pytest.raises(ValueError, match=match):
        build_backbone(cfg)
