"""Head contract: output shapes, initialisation, and how a cell's mask is formed."""
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec

from helpers import tiny_cfg
from solo_d2.modeling import DecoupledSOLOHead, SOLOHead, build_solo_head
from solo_d2.modeling.layers import DeformConv3x3

GRIDS = [12, 10, 8, 6, 4]


def features(n=2, c=64, size=128, strides=(4, 8, 16, 32, 64)):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, c, -(-size // s), -(-size // s), generator=g) for s in strides]


@pytest.mark.parametrize("cls", [SOLOHead, DecoupledSOLOHead])
def test_forward_shapes(cls):
    head = cls(num_classes=4, in_channels=64, num_grids=GRIDS, conv_channels=32, num_stacked_convs=2, norm="GN")
    cate, mask_feats = head(features())
    assert [tuple(c.shape) for c in cate] == [(2, 4, s, s) for s in GRIDS]
    # Tower outputs at the resized levels' sizes; masks x2: strides [4, 4, 8, 16, 16] at 128 px.
    assert [tuple(m.shape) for m in mask_feats] == [(2, 32, h, h) for h in (16, 16, 8, 4, 4)]
    assert [head.mask_size(m) for m in mask_feats] == [(h, h) for h in (32, 32, 16, 8, 8)]
    assert all(c.dtype == torch.float32 for c in cate)


@pytest.mark.parametrize("name", ["SOLOHead", "DecoupledSOLOHead"])
def test_built_from_cfg_with_prior_bias(name):
    cfg = tiny_cfg(name)
    head = build_solo_head(cfg, [ShapeSpec(channels=64, stride=s) for s in (4, 8, 16, 32, 64)])
    assert type(head).__name__ == name
    prior = -math.log(99)
    assert torch.allclose(head.cate_pred.bias, torch.full_like(head.cate_pred.bias, prior))
    for p in head.mask_output_parameters():
        if p.dim() == 1:
            assert torch.allclose(p, torch.full_like(p, prior))
    if name == "SOLOHead":
        assert [m.out_channels for m in head.mask_preds] == [s * s for s in GRIDS]
    else:
        assert [(m["x"].out_channels, m["y"].out_channels) for m in head.mask_preds] == [(s, s) for s in GRIDS]


def test_unknown_head_type_names_the_key():
    cfg = tiny_cfg("NoSuchHead")
    with pytest.raises(ValueError, match="MODEL.SOLO.HEAD_TYPE"):
        build_solo_head(cfg, [ShapeSpec(channels=64, stride=s) for s in (4, 8, 16, 32, 64)])


@pytest.mark.parametrize("cls", [SOLOHead, DecoupledSOLOHead])
def test_mask_probs_equal_full_masks_selected(cls):
    torch.manual_seed(0)
    head = cls(num_classes=4, in_channels=64, num_grids=GRIDS, conv_channels=32, num_stacked_convs=1)
    for p in head.mask_output_parameters():  # away from the prior, so values differ per cell
        torch.nn.init.normal_(p, std=0.5)
    _, mask_feats = head(features())
    img = torch.tensor([1, 0, 1, 0])
    cell = torch.tensor([0, 17, 99, 143])
    got = head.mask_probs(mask_feats[0], 0, img, cell)
    full = head.full_mask_probs(mask_feats[0], 0)
    assert got.shape == (4, 32, 32)
    assert torch.allclose(got, full[img, cell], atol=1e-6)


def test_decoupled_mask_is_product_of_x_column_and_y_row():
    torch.manual_seed(0)
    head = DecoupledSOLOHead(num_classes=4, in_channels=64, num_grids=GRIDS, conv_channels=32, num_stacked_convs=1)
    for p in head.mask_output_parameters():
        torch.nn.init.normal_(p, std=0.5)
    _, mask_feats = head(features())
    level, s = 1, 10
    i, j = 3, 7  # cell k = i * S + j = 37
    # The reference's order: upsample the tower output x2, then the 1x1 convs.
    feat = F.interpolate(mask_feats[level], scale_factor=2.0, mode="bilinear")
    x = head.mask_preds[level]["x"](feat)  # (N, S, H, W), channel j = column j
    y = head.mask_preds[level]["y"](feat)  # channel i = row i
    expected = torch.sigmoid(x[1, j]) * torch.sigmoid(y[1, i])
    got = head.mask_probs(mask_feats[level], level, torch.tensor([1]), torch.tensor([i * s + j]))[0]
    assert got.shape == (32, 32)  # level 1: stride 4 on the 128 px input
    assert torch.allclose(got, expected, atol=1e-6)


def test_vanilla_masks_equal_the_reference_order_upsample_then_conv():
    # The head applies the 1x1 output conv before the x2 upsample; both are linear (the upsample's
    # weights sum to 1), so the masks equal the reference's conv(upsample(tower output)).
    torch.manual_seed(0)
    head = SOLOHead(num_classes=4, in_channels=64, num_grids=GRIDS, conv_channels=32, num_stacked_convs=1)
    for p in head.mask_output_parameters():
        torch.nn.init.normal_(p, std=0.5)
    _, mask_feats = head(features())
    level = 2
    up = F.interpolate(mask_feats[level], scale_factor=2.0, mode="bilinear")
    expected = head.mask_preds[level](up).sigmoid()  # (N, S^2, 16, 16)
    img, cell = torch.tensor([0, 1, 1]), torch.tensor([0, 9, 63])
    got = head.mask_probs(mask_feats[level], level, img, cell)
    assert got.shape == (3, 16, 16)
    assert torch.allclose(got, expected[img, cell], atol=1e-6)
    assert torch.allclose(head.full_mask_probs(mask_feats[level], level), expected, atol=1e-6)


def test_deformable_tower_forward_backward():
    head = DecoupledSOLOHead(
        num_classes=4, in_channels=64, num_grids=GRIDS, conv_channels=32, num_stacked_convs=3, num_deformable_convs=2
    )
    cate, mask_feats = head(features(n=1, size=64))
    loss = sum(c.sum() for c in cate) + sum(m.sum() for m in mask_feats)
    loss.backward()
    offsets = [m.conv_offset.weight for m in head.modules() if hasattr(m, "conv_offset")]
    assert len(offsets) == 4  # the last 2 convs of each of the 2 towers
    assert not isinstance(head.mask_tower[0], DeformConv3x3) and isinstance(head.mask_tower[-3], DeformConv3x3)
    assert all(w.grad is not None and torch.isfinite(w.grad).all() for w in offsets)
    assert any(w.grad.abs().sum() > 0 for w in offsets)


def test_mask_prior_prob_sets_only_the_mask_output_bias():
    # Decoupled SOLO with MASK_PRIOR_PROB 0.1: X and Y start at 0.1, so a cell's mask starts at
    # 0.1 * 0.1 = 0.01, where vanilla SOLO's masks start; the category prior is unchanged.
    head = DecoupledSOLOHead(
        num_classes=4, in_channels=64, num_grids=GRIDS, conv_channels=32, num_stacked_convs=1,
        prior_prob=0.01, mask_prior_prob=0.1,
    )
    assert torch.allclose(head.cate_pred.bias, torch.full((4,), -math.log(99)))
    for conv in head._mask_output_convs():
        assert torch.allclose(conv.bias, torch.full_like(conv.bias, -math.log(9)))
    _, mask_feats = head(features())
    probs = head.full_mask_probs(mask_feats[0], 0)
    # Weights N(0, 0.01) add a little noise around the bias.
    assert abs(probs.mean().item() - 0.01) < 1e-3
    assert 0.005 < probs.min().item() and probs.max().item() < 0.02


@pytest.mark.parametrize("key, value", [("prior_prob", 0.0), ("prior_prob", 1.0), ("mask_prior_prob", 1.5)])
def test_bad_prior_names_the_key(key, value):
    with pytest.raises(ValueError, match=key.upper()):
        SOLOHead(num_classes=4, in_channels=64, num_grids=GRIDS, **{key: value})


def test_msra_tower_init_keeps_output_layers_and_deformable_offsets():
    torch.manual_seed(0)
    head = DecoupledSOLOHead(
        num_classes=4, in_channels=64, num_grids=GRIDS, conv_channels=64, num_stacked_convs=3,
        num_deformable_convs=1, tower_init="msra",
    )
    convs = [m for tower in (head.cate_tower, head.mask_tower) for m in tower if hasattr(m, "weight") and m.weight.dim() == 4]
    assert len(convs) == 6
    for conv in convs:  # He init, fan_out = 64 * 9: std sqrt(2 / 576) = 0.059
        assert abs(conv.weight.std().item() - math.sqrt(2 / 576)) < 0.005
    offsets = [m.conv_offset for m in head.modules() if isinstance(m, DeformConv3x3)]
    assert len(offsets) == 2 and all(not o.weight.any() and not o.bias.any() for o in offsets)
    assert abs(head.cate_pred.weight.std().item() - 0.01) < 0.002  # output layers: N(0, 0.01)
    assert torch.allclose(head.cate_pred.bias, torch.full((4,), -math.log(99)))
    # The reference init too: offsets start at zero (a deformable conv starts as a plain one).
    normal = DecoupledSOLOHead(
        num_classes=4, in_channels=64, num_grids=GRIDS, num_stacked_convs=2, num_deformable_convs=2
    )
    offsets = [m.conv_offset for m in normal.modules() if isinstance(m, DeformConv3x3)]
    assert len(offsets) == 4 and all(not o.weight.any() and not o.bias.any() for o in offsets)
    with pytest.raises(ValueError, match="MODEL.SOLO.TOWER_INIT = 'xavier'"):
        SOLOHead(num_classes=4, in_channels=64, num_grids=GRIDS, tower_init="xavier")
