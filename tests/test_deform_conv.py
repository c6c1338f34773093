"""DeformConv (DCN v1 / v2 on torchvision's deform_conv2d) against hand computations."""
import math

import torch
import torch.nn.functional as F

from solo_d2.modeling.layers import DeformConv, DeformConv3x3


def _layer(modulated=True, bias=True, k=3, cin=3, cout=4):
    torch.manual_seed(0)
    conv = DeformConv(cin, cout, k, bias=bias, modulated=modulated)
    if bias:
        with torch.no_grad():
            conv.bias.uniform_(-1, 1)
    return conv


def test_offset_conv_channels_and_zero_init():
    assert DeformConv3x3(3, 4).conv_offset.out_channels == 18
    assert DeformConv3x3(3, 4, modulated=True).conv_offset.out_channels == 27
    assert DeformConv(3, 4, 1, modulated=True).conv_offset.out_channels == 3
    c = DeformConv3x3(3, 4, modulated=True)
    assert not c.conv_offset.weight.any() and not c.conv_offset.bias.any()


def test_v2_zero_offsets_half_modulation_halves_the_kernel_not_the_bias():
    # zero-initialised offset conv: offsets 0, modulation logits 0 -> sigmoid 0.5
    x = torch.randn(2, 3, 7, 9)
    for k in (3, 1):
        conv = _layer(k=k)
        expected = 0.5 * F.conv2d(x, conv.weight, None, padding=k // 2) + conv.bias[:, None, None]
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    conv = _layer(bias=False)
    torch.testing.assert_close(conv(x), 0.5 * F.conv2d(x, conv.weight, padding=1), rtol=1e-5, atol=1e-5)


def test_v2_modulation_channel_p_scales_kernel_position_p():
    # The modulation logits are the offset conv's last 9 channels (mmcv's chunk order); only
    # kernel position p = 5 (row 1, column 2) switched on: the conv of that tap alone.
    x = torch.randn(1, 3, 6, 5)
    conv = _layer()
    with torch.no_grad():
        logits = torch.full((9,), -100.0)
        logits[5] = math.log(3.0)  # sigmoid = 0.75
        conv.conv_offset.bias[18:] = logits
    tap = torch.zeros_like(conv.weight)
    tap[:, :, 1, 2] = conv.weight[:, :, 1, 2]
    expected = 0.75 * F.conv2d(x, tap, None, padding=1) + conv.bias[:, None, None]
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


def test_v2_known_offset_by_hand_and_equals_v1_scaled():
    # Every kernel position shifted one pixel right (dx = +1), modulation 0.75: each output pixel
    # (i, j) reads x[i - 1 + ki, j + kj], i.e. a valid conv of x padded by 1 row above and below,
    # 0 columns left and 2 right. The offsets are cat(a, b) of the chunks a, b, m (mmcv's order),
    # (dy, dx) per position: dx of position p is channel 2p + 1 of cat(a, b).
    x = torch.randn(2, 3, 5, 6)
    conv = _layer()
    with torch.no_grad():
        offsets = torch.zeros(18)
        offsets[1::2] = 1.0
        conv.conv_offset.bias[:18] = offsets  # cat(a, b) is channels 0..17 of the output
        conv.conv_offset.bias[18:] = math.log(3.0)
    padded = F.pad(x, (0, 2, 1, 1))
    by_hand = 0.75 * F.conv2d(padded, conv.weight, None) + conv.bias[:, None, None]
    out = conv(x)
    torch.testing.assert_close(out, by_hand, rtol=1e-5, atol=1e-5)
    # DCN v1 with the same offsets and a 0.75 kernel
    v1 = DeformConv3x3(3, 4, modulated=False)
    with torch.no_grad():
        v1.weight.copy_(0.75 * conv.weight)
        v1.bias.copy_(conv.bias)
        v1.conv_offset.bias.copy_(offsets)
    torch.testing.assert_close(out, v1(x), rtol=1e-5, atol=1e-5)


def test_v2_gradients_reach_offsets_and_modulation():
    conv = _layer()
    x = torch.randn(1, 3, 5, 5)
    conv(x).square().sum().backward()
    g = conv.conv_offset.bias.grad
    assert g is not None and g[18:].abs().sum() > 0 and g[:18].abs().sum() > 0


def test_deformable_mask_feature_branch_starts_as_the_plain_one_with_halved_kernels():
    # SOLOv2's mask feature branch with every conv DCN v2 (the R-101 DCN model): with zero
    # offsets and modulation 0.5 it equals the plain branch whose conv kernels (not biases) are
    # halved (no norm, which would hide the scale).
    from solo_d2.modeling.mask_feature_head import MaskFeatureHead

    torch.manual_seed(0)
    dcn = MaskFeatureHead(8, 32, 16, 4, "", deformable=True, modulated=True)
    plain = MaskFeatureHead(8, 32, 16, 4, "")
    with torch.no_grad():
        for c in dcn.convs():
            c.bias.uniform_(-1, 1)
    sd = {k: v for k, v in dcn.state_dict().items() if "conv_offset" not in k}
    sd = {k: 0.5 * v if k.endswith(".weight") and v.dim() == 4 else v for k, v in sd.items()}
    plain.load_state_dict(sd, strict=True)
    feats = [torch.randn(2, 8, 16 // 2**i, 24 // 2**i) for i in range(4)]
    out = dcn(feats)
    assert out.shape == (2, 16, 16, 24)
    torch.testing.assert_close(out, plain(feats), rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    assert all(p.grad is not None for p in dcn.parameters())
