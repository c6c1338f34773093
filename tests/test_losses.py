"""Loss values on small inputs computed by hand."""
import math

import torch

from solo_d2.modeling.losses import category_loss, dice_loss, mask_loss


def test_dice_loss_by_hand():
    p = torch.ones(1, 2, 2)
    q = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # 1 - 2 * 1 / (4 + 1 + 2e-3)
    assert torch.allclose(dice_loss(p, q), torch.tensor([1 - 2 / 5.002]))
    perfect = dice_loss(q, q.bool())
    assert torch.allclose(perfect, torch.tensor([1 - 2 / 2.002]), atol=1e-6)
    assert dice_loss(torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)).tolist() == [1.0, 1.0, 1.0]


def test_category_focal_loss_by_hand():
    # One cell, two classes, logits 0 (p = 0.5), label 0.
    # positive: 0.25 * 0.5^2 * log 2; negative: 0.75 * 0.5^2 * log 2; divided by (1 + 1).
    logits = [torch.zeros(1, 2, 1, 1)]
    labels = [torch.zeros(1, 1, 1, dtype=torch.int64)]
    expected = (0.25 + 0.75) * 0.25 * math.log(2) / 2
    assert math.isclose(category_loss(logits, labels, 2).item(), expected, rel_tol=1e-6)
    # The same cell as background: only the two negative terms, divided by (0 + 1).
    bg = [torch.full((1, 1, 1), 2, dtype=torch.int64)]
    assert math.isclose(category_loss(logits, bg, 2).item(), 2 * 0.75 * 0.25 * math.log(2), rel_tol=1e-6)


def test_category_loss_layout_matches_labels():
    # Class 1 at cell (0, 1) of a 2x2 grid: a large logit there gives a much smaller loss than
    # the same logit at the transposed cell (1, 0).
    labels = [torch.full((1, 2, 2), 3, dtype=torch.int64)]
    labels[0][0, 0, 1] = 1
    good = torch.full((1, 3, 2, 2), -8.0)
    good[0, 1, 0, 1] = 8.0
    bad = torch.full((1, 3, 2, 2), -8.0)
    bad[0, 1, 1, 0] = 8.0
    assert category_loss([good], labels, 3) < 0.01 < category_loss([bad], labels, 3)


def test_mask_loss_mean_over_cells_and_empty():
    p = [torch.ones(1, 2, 2), torch.zeros(0, 4, 4), torch.ones(1, 3, 3)]
    q = [torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), torch.zeros(0, 4, 4), torch.ones(1, 3, 3)]
    expected = ((1 - 2 / 5.002) + (1 - 18 / 18.002)) / 2
    assert math.isclose(mask_loss(p, q).item(), expected, rel_tol=1e-6)
    feat = torch.rand(0, 4, 4, requires_grad=True)
    zero = mask_loss([feat], [torch.zeros(0, 4, 4)])
    assert zero.item() == 0.0 and zero.requires_grad


def test_dice_loss_is_exact_for_half_precision_inputs():
    # 90,000 pixels: the sums overflow float16 (max 65504) unless the loss computes in float32.
    p = torch.ones(1, 300, 300, dtype=torch.float16)
    loss = dice_loss(p, p > 0)
    assert loss.dtype == torch.float32
    assert math.isclose(loss.item(), 1 - 180000 / 180000.002, abs_tol=1e-6)
