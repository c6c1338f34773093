"""SOLO losses: sigmoid focal loss on the category grids, dice loss on the positive cells' masks."""
from typing import List

import torch
from fvcore.nn import sigmoid_focal_loss

__all__ = ["dice_loss", "category_loss", "mask_loss"]


def dice_loss(probs: torch.Tensor, targets: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Dice loss per mask: 1 - 2 * sum(p * q) / (sum(p^2) + sum(q^2) + 2 * eps).

    Args:
        probs: (K, H, W) float in [0, 1] (already probabilities: no sigmoid is applied here).
        targets: (K, H, W) float or bool, 0/1.
    Returns:
        (K,) float.
    """
    p = probs.flatten(1).float()  # float32: fp16 sums over a mask's pixels overflow
    q = targets.flatten(1).float()
    inter = (p * q).sum(1)
    union = (p * p).sum(1) + (q * q).sum(1) + 2 * eps
    return 1 - 2 * inter / union


def category_loss(
    cate_logits: List[torch.Tensor],
    labels: List[torch.Tensor],
    num_classes: int,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss over every cell of every level, summed, divided by (positives + 1).

    Args:
        cate_logits: per level (N, C, S, S) float logits.
        labels: per level (N, S, S) int64, class 0..C-1, or C for a cell with no instance.
    Returns:
        scalar float.
    """
    logits = torch.cat(
        [x.permute(0, 2, 3, 1).reshape(-1, num_classes).float() for x in cate_logits]
    )
    flat = torch.cat([y.reshape(-1) for y in labels])
    pos = flat < num_classes
    onehot = torch.zeros_like(logits)
    onehot[pos, flat[pos]] = 1.0
    loss = sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma, reduction="sum")
    return loss / (pos.sum() + 1)


def mask_loss(pos_probs: List[torch.Tensor], pos_targets: List[torch.Tensor]) -> torch.Tensor:
    """Dice loss averaged over all positive cells of all levels.

    Args:
        pos_probs: per level (K_l, H_l, W_l) soft masks of the positive cells.
        pos_targets: per level (K_l, H_l, W_l) their 0/1 targets.
    Returns:
        scalar float; exactly 0 when there is no positive cell (the caller keeps it attached to
        the graph, see ``SOLO.losses``).
    """
    per_cell = [dice_loss(p, t) for p, t in zip(pos_probs, pos_targets) if p.shape[0] > 0]
    if not per_cell:
        ref = pos_probs[0] if pos_probs else torch.zeros(())
        return ref.sum() * 0.0
    return torch.cat(per_cell).mean()
