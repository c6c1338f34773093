"""SOLOv2 head: dynamic-kernel masks computed by hand, the kernel of each cell is the one its mask
uses (training and inference), the unified mask feature and its coordinate channels, parameter
names, initialisation and argument checks. The contracts shared with the other heads run in
test_heads.py / test_meta_arch.py (parametrized), learning in test_training.py, DDP in
test_distributed.py."""
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import ImageList

from helpers import instances, tiny_cfg
from solo_d2.modeling import SOLOv2Head, build_solo_head
from solo_d2.modeling.mask_feature_head import MaskFeatureHead

GRIDS = [12, 10, 8, 6, 4]


def features(n=2, c=64, size=128, strides=(4, 8, 16, 32, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, -(-size // s), -(-size // s), generator=g) for s in strides]


def small_head(**kw):
    torch.manual_seed(0)
    args = dict(num_classes=4, in_channels=64, num_grids=GRIDS, conv_channels=32, num_stacked_convs=2,
                mask_feature_channels=32, mask_feature_dim=32)
    head = SOLOv2Head(**{**args, **kw})
    for p in head.mask_output_parameters():  # away from the init, so kernels differ per cell
        torch.nn.init.normal_(p, std=0.5)
    return head


def _coords(h, w, n=2):
    xs, ys = torch.linspace(-1, 1, w), torch.linspace(-1, 1, h)
    return torch.stack([xs.expand(h, w), ys[:, None].expand(h, w)]).expand(n, 2, h, w)


def test_known_kernel_on_known_feature_gives_known_mask():
    head = small_head(mask_feature_dim=2, norm="")
    s = GRIDS[0]
    feat = torch.zeros(1, 2, 3, 3)
    feat[0, 0] = torch.eye(3)  # channel 0: the diagonal
    feat[0, 1] = 1.0  # channel 1: ones
    kernels = torch.zeros(1, 2, s, s)
    kernels[0, :, 1, 0] = torch.tensor([2.0, -1.0])  # cell (1, 0): 2 * diagonal - 1
    kernels[0, :, 0, 1] = torch.tensor([0.0, 3.0])  # cell (0, 1): 3 everywhere
    got = head.mask_probs((kernels, feat), 0, torch.tensor([0, 0, 0]), torch.tensor([1 * s + 0, 0 * s + 1, 5]))
    a, b = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))
    expected_10 = torch.tensor([[a, b, b], [b, a, b], [b, b, a]])
    assert got.shape == (3, 3, 3)
    torch.testing.assert_close(got[0], expected_10)
    torch.testing.assert_close(got[1], torch.full((3, 3), 1 / (1 + math.exp(-3))))
    torch.testing.assert_close(got[2], torch.full((3, 3), 0.5))  # a zero kernel
    # out_size resizes the probabilities bilinearly
    up = head.mask_probs((kernels, feat), 0, torch.tensor([0]), torch.tensor([s]), out_size=(6, 6))
    torch.testing.assert_close(up[0], F.interpolate(expected_10[None, None], size=(6, 6), mode="bilinear")[0, 0])


def test_3x3_dynamic_kernel_is_a_padded_convolution():
    # k = 3: the kernel (E * 9 values, viewed as (E, 3, 3)) is cross-correlated with the feature,
    # zero padding 1. A single 1 at kernel position (0, 0) of channel 1 shifts that channel down
    # and right by one pixel.
    head = small_head(mask_feature_dim=2, dynamic_kernel_size=3, norm="")
    assert head.kernel_pred.out_channels == 18
    s = GRIDS[2]
    feat = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4) / 10
    kernels = torch.zeros(1, 18, s, s)
    kernels[0, 9 + 0, 2, 3] = 1.0  # channel 1, kernel row 0, column 0, cell (2, 3)
    logits = torch.zeros(4, 4)
    logits[1:, 1:] = feat[0, 1, :3, :3]
    got = head.mask_probs((kernels, feat), 2, torch.tensor([0]), torch.tensor([2 * s + 3]))
    torch.testing.assert_close(got[0], logits.sigmoid())


def test_each_cell_uses_its_own_kernel_and_its_image():
    head = small_head()
    cate, mask_feats = head(features())
    level, s = 1, GRIDS[1]
    kernels, unified = mask_feats[level]
    img = torch.tensor([1, 0, 1, 1])
    cells = torch.tensor([3 * s + 7, 0, s * s - 1, 12])
    got = head.mask_probs(mask_feats[level], level, img, cells)
    for r, (b, k) in enumerate(zip(img.tolist(), cells.tolist())):
        i, j = divmod(k, s)
        expected = torch.einsum("e,ehw->hw", kernels[b, :, i, j], unified[b]).sigmoid()
        torch.testing.assert_close(got[r], expected, atol=1e-5, rtol=0)
    full = head.full_mask_probs(mask_feats[level], level)
    assert full.shape == (2, s * s, 32, 32)
    torch.testing.assert_close(full[img, cells], got, atol=1e-5, rtol=0)
    # image 1 alone (what inference hands the head) gives image 1's masks
    alone = head.mask_probs(head.image_mask_feat(mask_feats[level], 1), level, torch.zeros_like(cells), cells)
    torch.testing.assert_close(alone[img == 1], got[img == 1])


def test_forward_shapes_and_unified_feature():
    head = small_head()
    cate, mask_feats = head(features())
    assert [tuple(c.shape) for c in cate] == [(2, 4, s, s) for s in GRIDS]
    for level, (kernels, unified) in enumerate(mask_feats):
        assert tuple(kernels.shape) == (2, 32, GRIDS[level], GRIDS[level])
        assert unified is mask_feats[0][1]  # one unified feature shared by all levels
    assert tuple(mask_feats[0][1].shape) == (2, 32, 32, 32)  # stride 4 at 128 px, E = 32
    # every level's masks are at the unified feature's size (stride 4)
    assert [head.mask_size(m) for m in mask_feats] == [(32, 32)] * 5
    assert all(t.dtype == torch.float32 for m in mask_feats for t in head.mask_feat_tensors(m))


def test_unified_feature_coordinates_only_on_the_coarsest_level_and_upsampled_sums():
    torch.manual_seed(0)
    mf = MaskFeatureHead(in_channels=64, channels=32, out_channels=64, num_levels=4)
    feats = features()
    seen = {}
    for i, level in enumerate(mf.levels):
        level[0].register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, inp[0].detach()))
    out = mf(feats)
    assert out.shape == (2, 64, 32, 32)
    assert [seen[i].shape[1] for i in range(4)] == [64, 64, 64, 66]
    assert torch.equal(seen[3][:, 64:], _coords(4, 4))  # P5 (4x4) gets x then y in [-1, 1]
    assert torch.equal(seen[3][:, :64], feats[3])
    # the reference's composition: level i = i x (conv, x2 upsample), level 0 one conv; sum; 1x1
    up = lambda t: F.interpolate(t, scale_factor=2.0, mode="bilinear")  # noqa: E731
    total = mf.levels[0][0](feats[0])
    for i in range(1, 4):
        x = seen[i]
        for conv in mf.levels[i]:
            x = up(conv(x))
        total = total + x
    torch.testing.assert_close(out, mf.pred(total))


def test_kernel_branch_input_is_feature_and_coordinates_resized_to_the_grid():
    head = small_head()
    feats = features()
    seen = {}
    head.kernel_tower[0].register_forward_hook(lambda m, inp, out: seen.setdefault("k", []).append(inp[0]))
    head.cate_tower[0].register_forward_hook(lambda m, inp, out: seen.setdefault("c", []).append(inp[0]))
    head(feats)
    level, s = 2, GRIDS[2]  # P4, 8x8, not resized
    k_in, c_in = seen["k"][level], seen["c"][level]
    expected = F.interpolate(torch.cat([feats[level], _coords(8, 8)], 1), size=(s, s), mode="bilinear")
    assert k_in.shape == (2, 66, s, s) and c_in.shape == (2, 64, s, s)
    torch.testing.assert_close(k_in, expected)
    torch.testing.assert_close(c_in, k_in[:, :64])  # the category branch: the same, no coordinates


def test_kernel_of_each_positive_cell_is_used_in_training():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("SOLOv2Head"))
    model.train()
    batch = [
        {"image": torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8),
         "instances": instances(128, 128, [(10, 20, 90, 110, 1), (60, 60, 100, 80, 2)])},
        {"image": torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8),
         "instances": instances(128, 128, [(0, 0, 40, 30, 0)])},
    ]
    calls = []
    original = model.head.mask_probs

    def spy(feat, level, img, cell, out_size=None):
        out = original(feat, level, img, cell, out_size)
        calls.append((feat, level, img, cell, out))
        return out

    model.head.mask_probs = spy
    model(batch)
    assert sum(c[2].numel() for c in calls) > 0
    s_of = model.head.num_grids
    for (kernels, unified), level, img, cell, out in calls:
        s = s_of[level]
        for r in range(img.numel()):
            i, j = divmod(int(cell[r]), s)
            w = kernels[img[r], :, i, j]
            expected = torch.einsum("e,ehw->hw", w, unified[img[r]]).sigmoid()
            torch.testing.assert_close(out[r], expected, atol=1e-5, rtol=0)


def test_kernel_of_the_detected_cell_gives_the_output_mask():
    # Inference: one cell scores high; its kernel selects the left half of the unified feature,
    # every other cell's kernel the right half. The detection's mask is the left half.
    model = build_model(tiny_cfg("SOLOv2Head")).eval()
    e = model.head.mask_feature_dim
    unified = torch.zeros(1, e, 32, 32)
    unified[0, 0, :, :16] = 1.0  # channel 0: left half
    unified[0, 1, :, 16:] = 1.0  # channel 1: right half
    mask_feats, cate = [], []
    for level, s in enumerate(model.head.num_grids):
        k = torch.zeros(1, e, s, s)
        k[0, 0] = -10.0
        k[0, 1] = 10.0
        k[0, 2] = -5.0  # bias-like constant feature absent: channel 2 of unified is 0
        c = torch.full((1, 4, s, s), -10.0)
        if level == 1:
            k[0, 0, 4, 6], k[0, 1, 4, 6] = 20.0, -20.0
            c[0, 2, 4, 6] = 5.0
        mask_feats.append((k, unified))
        cate.append(c)
    images = ImageList(torch.zeros(1, 3, 128, 128), [(128, 128)])
    out = model.inference_from_outputs(cate, mask_feats, images, [{"image": torch.zeros(3, 128, 128)}])
    inst = out[0]["instances"]
    assert len(inst) == 1 and inst.pred_classes.tolist() == [2]
    expected = torch.zeros(128, 128, dtype=torch.bool)
    expected[:, :64] = True
    assert torch.equal(inst.pred_masks[0], expected)


def test_parameter_names_and_initialisation():
    head = SOLOv2Head(num_classes=4, in_channels=64, num_grids=GRIDS, conv_channels=32,
                      num_stacked_convs=2, mask_feature_channels=32, mask_feature_dim=64)
    sd = head.state_dict()
    for t, cin in (("cate_tower", 64), ("kernel_tower", 66)):
        assert sd[f"{t}.0.weight"].shape == (32, cin, 3, 3) and f"{t}.1.weight" in sd
        assert sd[f"{t}.3.weight"].shape == (32, 32, 3, 3)
    assert sd["cate_pred.weight"].shape == (4, 32, 3, 3)
    assert sd["kernel_pred.weight"].shape == (64, 32, 3, 3)
    mf = sorted(k for k in sd if k.startswith("mask_feature."))
    assert mf == sorted(
        [f"mask_feature.levels.{i}.{j}.{p}" for i, n in enumerate([1, 1, 2, 3]) for j in range(n)
         for p in ("weight", "norm.weight", "norm.bias")]
        + ["mask_feature.pred.weight", "mask_feature.pred.norm.weight", "mask_feature.pred.norm.bias"]
    )
    assert sd["mask_feature.levels.3.0.weight"].shape == (32, 66, 3, 3)
    assert sd["mask_feature.levels.2.1.weight"].shape == (32, 32, 3, 3)
    assert sd["mask_feature.pred.weight"].shape == (64, 32, 1, 1)
    assert len(sd) == len([k for k in sd if k.split(".")[0] in
                           ("cate_tower", "cate_pred", "kernel_tower", "kernel_pred", "mask_feature")])
    # reference init: N(0, 0.01) convs, prior bias on the category conv only
    assert torch.allclose(head.cate_pred.bias, torch.full((4,), -math.log(99)))
    assert not head.kernel_pred.bias.any()
    assert abs(head.mask_feature.pred.weight.std().item() - 0.01) < 0.003
    assert head.mask_output_parameters() == [head.kernel_pred.weight, head.kernel_pred.bias]


def test_built_from_cfg():
    cfg = tiny_cfg("SOLOv2Head", **{"MODEL.SOLO.MASK_FEATURE_DIM": 32, "MODEL.SOLO.DYNAMIC_KERNEL_SIZE": 3})
    head = build_solo_head(cfg, [ShapeSpec(channels=64, stride=s) for s in (4, 8, 16, 32, 64)])
    assert isinstance(head, SOLOv2Head)
    assert head.kernel_pred.out_channels == 32 * 9 and head.mask_feature.pred.out_channels == 32


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(dynamic_kernel_size=2), "MODEL.SOLO.DYNAMIC_KERNEL_SIZE = 2"),
        (dict(dynamic_kernel_size=0), "MODEL.SOLO.DYNAMIC_KERNEL_SIZE = 0"),
        (dict(mask_feature_dim=0), "MODEL.SOLO.MASK_FEATURE_DIM = 0"),
        (dict(mask_feature_channels=0), "MODEL.SOLO.MASK_FEATURE_CHANNELS = 0"),
        (dict(mask_feature_num_levels=6), "MODEL.SOLO.MASK_FEATURE_NUM_LEVELS = 6"),
        (dict(mask_feature_num_levels=0), "MODEL.SOLO.MASK_FEATURE_NUM_LEVELS = 0"),
        (dict(mask_prior_prob=0.1), "MODEL.SOLO.MASK_PRIOR_PROB"),
    ],
)
def test_bad_arguments_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        SOLOv2Head(num_classes=4, in_channels=64, num_grids=GRIDS, **kw)
