"""Head contract (every head type): output shapes, parameter names, initialisation, and how a
cell's mask is formed, checked against the reference heads' order of operations."""
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec

from helpers import tiny_cfg
from solo_d2.modeling import (
    DecoupledSOLOCompactHead,
    DecoupledSOLOHead,
    DecoupledSOLOLightHead,
    SOLOHead,
    SOLOv2Head,
    build_solo_head,
)
from solo_d2.modeling.layers import DeformConv3x3

GRIDS = [12, 10, 8, 6, 4]
HEADS = [SOLOHead, DecoupledSOLOHead, DecoupledSOLOLightHead, DecoupledSOLOCompactHead]
DECOUPLED = [DecoupledSOLOHead, DecoupledSOLOLightHead, DecoupledSOLOCompactHead]


def features(n=2, c=64, size=128, strides=(4, 8, 16, 32, 64)):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, c, -(-size // s), -(-size // s), generator=g) for s in strides]


def small_head(cls, **kw):
    torch.manual_seed(0)
    args = dict(num_classes=4, in_channels=64, num_grids=GRIDS, conv_channels=32, num_stacked_convs=1)
    head = cls(**{**args, **kw})
    for p in head.mask_output_parameters():  # away from the prior, so values differ per cell
        torch.nn.init.normal_(p, std=0.5)
    return head


@pytest.mark.parametrize("cls", HEADS)
def test_forward_shapes(cls):
    head = cls(num_classes=4, in_channels=64, num_grids=GRIDS, conv_channels=32, num_stacked_convs=2, norm="GN")
    cate, mask_feats = head(features())
    assert [tuple(c.shape) for c in cate] == [(2, 4, s, s) for s in GRIDS]
    # Masks have strides [4, 4, 8, 16, 16] at 128 px: twice the resized levels' sizes.
    assert [head.mask_size(m) for m in mask_feats] == [(h, h) for h in (32, 32, 16, 8, 8)]
    if cls is SOLOHead:  # the tower output, at the resized levels' sizes
        assert [tuple(m.shape) for m in mask_feats] == [(2, 32, h, h) for h in (16, 16, 8, 4, 4)]
    else:  # X and Y logits, 2S channels at the mask resolution
        assert [tuple(m.shape) for m in mask_feats] == [
            (2, 2 * s, h, h) for s, h in zip(GRIDS, (32, 32, 16, 8, 8))
        ]
    assert all(c.dtype == torch.float32 for c in cate + mask_feats)


# The parameter names are a contract with tools/convert_weights.py (docs/head_parameter_names.md).
def _tower_keys(name, num_convs=2, norm=True):
    step = 3 if norm else 2
    keys = []
    for i in range(num_convs):
        keys.append(f"{name}.{step * i}.weight")
        if norm:
            keys += [f"{name}.{step * i + 1}.weight", f"{name}.{step * i + 1}.bias"]
        else:
            keys.append(f"{name}.{step * i}.bias")
    return keys


def _out_keys(suffixes):
    return [f"mask_preds.{level}{sfx}.{p}" for level in range(5) for sfx in suffixes for p in ("weight", "bias")]


@pytest.mark.parametrize(
    "cls, towers, out_suffixes, kernel, in_extra",
    [
        (SOLOHead, ["mask_tower"], [""], 1, {"mask_tower": 2}),
        (DecoupledSOLOHead, ["mask_tower_x", "mask_tower_y"], [".x", ".y"], 3, {"mask_tower_x": 1, "mask_tower_y": 1}),
        (DecoupledSOLOLightHead, ["mask_tower"], [".x", ".y"], 3, {"mask_tower": 2}),
        (DecoupledSOLOCompactHead, ["mask_tower"], [".x", ".y"], 1, {"mask_tower": 2}),
    ],
)
@pytest.mark.parametrize("norm", ["GN", ""])
def test_parameter_names_and_shapes(cls, towers, out_suffixes, kernel, in_extra, norm):
    head = cls(num_classes=4, in_channels=64, num_grids=GRIDS, conv_channels=32, num_stacked_convs=2, norm=norm)
    sd = head.state_dict()
    expected = _tower_keys("cate_tower", norm=bool(norm)) + ["cate_pred.weight", "cate_pred.bias"]
    for t in towers:
        expected += _tower_keys(t, norm=bool(norm))
    expected += _out_keys(out_suffixes)
    assert sorted(sd) == sorted(expected)
    assert sd["cate_tower.0.weight"].shape == (32, 64, 3, 3)
    assert sd["cate_pred.weight"].shape == (4, 32, 3, 3)
    for t, extra in in_extra.items():
        assert sd[f"{t}.0.weight"].shape == (32, 64 + extra, 3, 3)
    for level, s in enumerate(GRIDS):
        for sfx in out_suffixes:
            channels = s * s if cls is SOLOHead else s
            assert sd[f"mask_preds.{level}{sfx}.weight"].shape == (channels, 32, kernel, kernel)


@pytest.mark.parametrize("name", ["SOLOHead", "DecoupledSOLOHead", "DecoupledSOLOLightHead", "DecoupledSOLOCompactHead"])
def test_built_from_cfg_with_prior_bias(name):
    cfg = tiny_cfg(name)
    head = build_solo_head(cfg, [ShapeSpec(channels=64, stride=s) for s in (4, 8, 16, 32, 64)])
    assert type(head).__name__ == name
    prior = -math.log(99)
    assert torch.allclose(head.cate_pred.bias, torch.full_like(head.cate_pred.bias, prior))
    biases = [p for p in head.mask_output_parameters() if p.dim() == 1]
    assert len(biases) == 5 * (1 if name == "SOLOHead" else 2)
    assert all(torch.allclose(p, torch.full_like(p, prior)) for p in biases)


def test_unknown_head_type_names_the_key():
    cfg = tiny_cfg("NoSuchHead")
    with pytest.raises(ValueError, match="MODEL.SOLO.HEAD_TYPE"):
        build_solo_head(cfg, [ShapeSpec(channels=64, stride=s) for s in (4, 8, 16, 32, 64)])


@pytest.mark.parametrize("cls", HEADS + [SOLOv2Head])
def test_mask_probs_equal_full_masks_selected(cls):
    head = small_head(cls)
    _, mask_feats = head(features())
    img = torch.tensor([1, 0, 1, 0])
    cell = torch.tensor([0, 17, 99, 143])
    got = head.mask_probs(mask_feats[0], 0, img, cell)
    full = head.full_mask_probs(mask_feats[0], 0)
    assert got.shape == (4, 32, 32) and full.shape == (2, 144, 32, 32)
    # SOLOv2 sums E = 256 products per pixel: another BLAS blocking, another float rounding
    atol = 1e-5 if cls is SOLOv2Head else 1e-6
    assert torch.allclose(got, full[img, cell], atol=atol)
    # out_size equal to the mask size changes nothing
    assert torch.equal(head.mask_probs(mask_feats[0], 0, img, cell, out_size=(32, 32)), got)
    # one image (inference): the same masks
    one = head.mask_probs(head.image_mask_feat(mask_feats[0], 1), 0, torch.zeros(2, dtype=torch.long), cell[[0, 2]])
    assert torch.allclose(one, full[1, cell[[0, 2]]], atol=atol)


def _capture_inputs(module, store, key):
    module.register_forward_hook(lambda m, i, o: store.__setitem__(key, i[0].detach().clone()))


def test_decoupled_published_towers_coordinates_and_upsample_then_3x3_conv():
    head = small_head(DecoupledSOLOHead, num_stacked_convs=2)
    feats = features()
    _, mask_feats = head(feats)
    level, s = 1, 10
    # Level 1 (P3, 16x16, not resized): the X tower sees the feature + the x coordinate
    # (linspace(-1, 1) along the width), the Y tower the feature + the y coordinate.
    lin = torch.linspace(-1, 1, 16)
    fx = torch.cat([feats[level], lin.expand(2, 1, 16, 16)], 1)
    fy = torch.cat([feats[level], lin[:, None].expand(2, 1, 16, 16)], 1)
    # The reference's order: tower, x2 bilinear upsample, then the 3x3 output conv.
    up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear")  # noqa: E731
    x = head.mask_preds[level]["x"](up(head.mask_tower_x(fx)))  # (N, S, 32, 32), channel j = column j
    y = head.mask_preds[level]["y"](up(head.mask_tower_y(fy)))  # channel i = row i
    i, j = 3, 7  # cell k = i * S + j = 37
    got = head.mask_probs(mask_feats[level], level, torch.tensor([1]), torch.tensor([i * s + j]))[0]
    assert got.shape == (32, 32)
    assert torch.allclose(got, x[1, j].sigmoid() * y[1, i].sigmoid(), atol=1e-6)
    # Conv then upsample would give other masks: a 3x3 conv does not commute with the upsample.
    x_swapped = up(head.mask_preds[level]["x"](head.mask_tower_x(fx)))
    assert not torch.allclose(x_swapped, x, atol=1e-4)


def test_coordinate_channels_of_each_head():
    # The coordinate channels appended to the last level (4x4) of each head's mask tower input.
    lin = torch.linspace(-1, 1, 4)
    xs, ys = lin.expand(4, 4), lin[:, None].expand(4, 4)
    for cls, towers in [
        (SOLOHead, {"mask_tower": [xs, ys]}),
        (DecoupledSOLOHead, {"mask_tower_x": [xs], "mask_tower_y": [ys]}),
        (DecoupledSOLOLightHead, {"mask_tower": [xs, ys]}),
    ]:
        head = small_head(cls)
        seen = {}
        for name in towers:
            _capture_inputs(getattr(head, name)[0], seen, name)
        head(features())
        for name, coords in towers.items():
            got = seen[name][:, 64:]
            assert got.shape == (2, len(coords), 4, 4), (cls, name)
            for c, expected in enumerate(coords):
                assert torch.equal(got[1, c], expected), (cls, name, c)


def test_light_head_shared_tower_upsample_then_3x3_conv():
    head = small_head(DecoupledSOLOLightHead, num_stacked_convs=2)
    feats = features()
    _, mask_feats = head(feats)
    level, s = 2, 8
    f = F.interpolate(head.mask_tower(torch.cat([feats[level], _coords(8)], 1)), scale_factor=2, mode="bilinear")
    x, y = head.mask_preds[level]["x"](f), head.mask_preds[level]["y"](f)
    img, cell = torch.tensor([0, 1, 1]), torch.tensor([0, 9, 63])
    got = head.mask_probs(mask_feats[level], level, img, cell)
    expected = x[img, cell % s].sigmoid() * y[img, cell // s].sigmoid()
    assert got.shape == (3, 16, 16)
    assert torch.allclose(got, expected, atol=1e-6)


def _coords(size, n=2):
    lin = torch.linspace(-1, 1, size)
    return torch.stack([lin.expand(size, size), lin[:, None].expand(size, size)]).expand(n, 2, size, size)


def test_compact_head_equals_the_upsample_then_1x1_order():
    # solo_d2's own variant: 1x1 X / Y convs before the upsample equal them after it.
    head = small_head(DecoupledSOLOCompactHead)
    feats = features()
    _, mask_feats = head(feats)
    level = 3
    f = F.interpolate(head.mask_tower(torch.cat([feats[level], _coords(4)], 1)), scale_factor=2, mode="bilinear")
    x, y = head.mask_preds[level]["x"](f).sigmoid(), head.mask_preds[level]["y"](f).sigmoid()
    full = head.full_mask_probs(mask_feats[level], level)
    assert torch.allclose(full, (y[:, :, None] * x[:, None]).reshape(2, 36, 8, 8), atol=1e-6)


@pytest.mark.parametrize("cls", DECOUPLED)
def test_decoupled_out_size_resizes_x_and_y_before_the_product(cls):
    # Inference compares all levels at the finest mask size; the reference resizes sigmoid(X)
    # and sigmoid(Y) to it and multiplies after (not the product resized).
    head = small_head(cls)
    _, mask_feats = head(features())
    level, s, out = 3, 6, (32, 32)
    img, cell = torch.tensor([0, 1]), torch.tensor([7, 20])  # (i, j) = (1, 1), (3, 2)
    got = head.mask_probs(mask_feats[level], level, img, cell, out_size=out)
    px, py = F.interpolate(mask_feats[level].sigmoid(), size=out, mode="bilinear").split(s, dim=1)
    expected = px[img, cell % s] * py[img, cell // s]
    assert got.shape == (2, 32, 32)
    assert torch.allclose(got, expected, atol=1e-6)
    product_resized = F.interpolate(head.mask_probs(mask_feats[level], level, img, cell)[:, None], size=out, mode="bilinear")[:, 0]
    assert (got - product_resized).abs().max() > 1e-3


def test_vanilla_masks_equal_the_reference_order_upsample_then_conv():
    # The head applies the 1x1 output conv before the x2 upsample; both are linear (the upsample's
    # weights sum to 1), so the masks equal the reference's conv(upsample(tower output)).
    head = small_head(SOLOHead)
    _, mask_feats = head(features())
    level = 2
    up = F.interpolate(mask_feats[level], scale_factor=2.0, mode="bilinear")
    expected = head.mask_preds[level](up).sigmoid()  # (N, S^2, 16, 16)
    img, cell = torch.tensor([0, 1, 1]), torch.tensor([0, 9, 63])
    got = head.mask_probs(mask_feats[level], level, img, cell)
    assert got.shape == (3, 16, 16)
    assert torch.allclose(got, expected[img, cell], atol=1e-6)
    assert torch.allclose(head.full_mask_probs(mask_feats[level], level), expected, atol=1e-6)
    # At inference the reference resizes sigmoid(mask) to the finest mask size.
    resized = head.mask_probs(mask_feats[level], level, img, cell, out_size=(32, 32))
    assert torch.allclose(resized, F.interpolate(expected[img, cell][:, None], size=(32, 32), mode="bilinear")[:, 0], atol=1e-6)


@pytest.mark.parametrize(
    "cls, towers", [(DecoupledSOLOLightHead, 2), (DecoupledSOLOHead, 3), (SOLOHead, 2), (SOLOv2Head, 2)]
)
def test_deformable_tower_forward_backward(cls, towers):
    # The light DCN model: the last conv of the category tower and of the mask tower(s).
    head = cls(num_classes=4, in_channels=64, num_grids=GRIDS, conv_channels=32, num_stacked_convs=3, num_deformable_convs=1)
    cate, mask_feats = head(features(n=1, size=64))
    loss = sum(c.sum() for c in cate) + sum(t.sum() for m in mask_feats for t in head.mask_feat_tensors(m))
    loss.backward()
    offsets = [m.conv_offset.weight for m in head.modules() if isinstance(m, DeformConv3x3)]
    assert len(offsets) == towers
    for t in [head.cate_tower, *head.mask_towers()]:
        assert isinstance(t[6], DeformConv3x3) and not isinstance(t[3], DeformConv3x3)
    assert "cate_tower.6.conv_offset.weight" in head.state_dict()
    assert all(w.grad is not None and torch.isfinite(w.grad).all() for w in offsets)
    assert any(w.grad.abs().sum() > 0 for w in offsets)


@pytest.mark.parametrize("cls", DECOUPLED)
def test_mask_prior_prob_sets_only_the_mask_output_bias(cls):
    # MASK_PRIOR_PROB 0.1: X and Y start at 0.1, so a cell's mask starts at 0.1 * 0.1 = 0.01,
    # where vanilla SOLO's masks start; the category prior is unchanged.
    head = cls(
        num_classes=4, in_channels=64, num_grids=GRIDS, conv_channels=32, num_stacked_convs=1,
        prior_prob=0.01, mask_prior_prob=0.1,
    )
    assert torch.allclose(head.cate_pred.bias, torch.full((4,), -math.log(99)))
    for conv in head.mask_output_convs():
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


@pytest.mark.parametrize("cls, num_towers", [(DecoupledSOLOLightHead, 2), (DecoupledSOLOHead, 3)])
def test_msra_tower_init_keeps_output_layers_and_deformable_offsets(cls, num_towers):
    torch.manual_seed(0)
    head = cls(
        num_classes=4, in_channels=64, num_grids=GRIDS, conv_channels=64, num_stacked_convs=3,
        num_deformable_convs=1, tower_init="msra",
    )
    towers = [head.cate_tower, *head.mask_towers()]
    convs = [m for t in towers for m in t if hasattr(m, "weight") and m.weight.dim() == 4]
    assert len(towers) == num_towers and len(convs) == 3 * num_towers
    for conv in convs:  # He init, fan_out = 64 * 9: std sqrt(2 / 576) = 0.059
        assert abs(conv.weight.std().item() - math.sqrt(2 / 576)) < 0.005
    offsets = [m.conv_offset for m in head.modules() if isinstance(m, DeformConv3x3)]
    assert len(offsets) == num_towers and all(not o.weight.any() and not o.bias.any() for o in offsets)
    assert abs(head.cate_pred.weight.std().item() - 0.01) < 0.002  # output layers: N(0, 0.01)
    assert torch.allclose(head.cate_pred.bias, torch.full((4,), -math.log(99)))
    # The reference init too: offsets start at zero (a deformable conv starts as a plain one).
    normal = cls(num_classes=4, in_channels=64, num_grids=GRIDS, num_stacked_convs=2, num_deformable_convs=2)
    offsets = [m.conv_offset for m in normal.modules() if isinstance(m, DeformConv3x3)]
    assert len(offsets) == 2 * num_towers and all(not o.weight.any() and not o.bias.any() for o in offsets)
    with pytest.raises(ValueError, match="MODEL.SOLO.TOWER_INIT = 'xavier'"):
        cls(num_classes=4, in_channels=64, num_grids=GRIDS, tower_init="xavier")
