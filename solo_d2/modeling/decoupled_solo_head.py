"""Decoupled SOLO: masks as products of an X map (indexed by column) and a Y map (by row).

:class:`BaseDecoupledSOLOHead` forms the masks from per-level X and Y logits and is shared by
every decoupled head type; :class:`DecoupledSOLOHead` is the published (non-light) architecture.
The light head and solo_d2's compact variant are in :mod:`.decoupled_solo_light_head`.
"""
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from .layers import coord_features
from .solo_head import SOLO_HEAD_REGISTRY, BaseSOLOHead, tower, upsample2x

__all__ = ["BaseDecoupledSOLOHead", "DecoupledSOLOHead"]


class BaseDecoupledSOLOHead(BaseSOLOHead):
    """Mask formation shared by the decoupled heads.

    ``mask_feats[l]`` is (N, 2 S_l, H_l, W_l) float: the X logits (channels 0..S-1, channel j for
    grid column j) followed by the Y logits (channels S..2S-1, channel S + i for grid row i), at
    the mask resolution (H_l, W_l) = twice the resized level's size. The mask of cell
    k = i*S + j is ``sigmoid(X_j) * sigmoid(Y_i)``: a probability already, so the dice loss takes
    it without another sigmoid. Only 2S channels are computed per level; products are formed for
    the chosen cells only.

    Subclasses build the towers and output convs: ``mask_preds.{l}.x`` and ``mask_preds.{l}.y``
    (S_l output channels each).
    """

    #: kernel size of the X / Y output convs (the published heads: 3, padding 1)
    OUTPUT_KERNEL = 3

    def _xy_output_convs(self, channels: int) -> nn.ModuleList:
        k = self.OUTPUT_KERNEL
        return nn.ModuleList(
            nn.ModuleDict(
                {
                    "x": nn.Conv2d(channels, s, kernel_size=k, padding=k // 2),
                    "y": nn.Conv2d(channels, s, kernel_size=k, padding=k // 2),
                }
            )
            for s in self.num_grids
        )

    def mask_output_convs(self) -> List[nn.Conv2d]:
        return [m[k] for m in self.mask_preds for k in ("x", "y")]

    def _xy_conv(self, feat: torch.Tensor, level: int) -> torch.Tensor:
        """X and Y output convs of ``level`` on one shared feature map, as one conv with 2S
        output channels (X first)."""
        out = self.mask_preds[level]
        return F.conv2d(
            feat,
            torch.cat([out["x"].weight, out["y"].weight]),
            torch.cat([out["x"].bias, out["y"].bias]),
            padding=self.OUTPUT_KERNEL // 2,
        )

    def mask_probs(self, mask_feat, level, img_idx, cell_idx, out_size=None):
        s = self.num_grids[level]
        col, row = cell_idx % s, s + cell_idx // s
        if out_size is None or tuple(out_size) == tuple(mask_feat.shape[-2:]):
            return mask_feat[img_idx, col].sigmoid() * mask_feat[img_idx, row].sigmoid()
        # The reference's inference order: resize sigmoid(X) and sigmoid(Y) to the finest mask
        # size, then multiply (all 2S maps of the images at hand: cheap, and exactly the
        # reference's values for any cell).
        probs = F.interpolate(mask_feat.sigmoid(), size=tuple(out_size), mode="bilinear")
        return probs[img_idx, col] * probs[img_idx, row]

    def full_mask_probs(self, mask_feat, level):
        s = self.num_grids[level]
        px, py = mask_feat.sigmoid().split(s, dim=1)  # (N, S, H, W) each
        n, _, h, w = px.shape
        return (py[:, :, None] * px[:, None, :]).reshape(n, s * s, h, w)

    def mask_size(self, mask_feat):
        return tuple(mask_feat.shape[-2:])


@SOLO_HEAD_REGISTRY.register()
class DecoupledSOLOHead(BaseDecoupledSOLOHead):
    """Decoupled SOLO as published (the official repository's ``DecoupledSOLOHead``,
    mmdetection's ``DecoupledSOLOHead``).

    Separate X and Y mask towers, each fed the level's feature plus *one* coordinate channel (the
    normalised x coordinate, ``linspace(-1, 1)`` along the width, for X; y along the height for
    Y); each tower's output is upsampled x2 (bilinear) and then goes through a 3x3 output conv
    with S channels (X: ``mask_preds.{l}.x``, Y: ``mask_preds.{l}.y``). A 3x3 conv does not
    commute with the upsample, so the order is the reference's: upsample, then conv.

    Parameters: ``cate_tower``, ``cate_pred``, ``mask_tower_x``, ``mask_tower_y``,
    ``mask_preds.{l}.x``, ``mask_preds.{l}.y``.
    """

    def _build_mask_branch(self, in_channels, conv_channels, num_convs, norm, num_deformable):
        self.mask_tower_x = tower(in_channels + 1, conv_channels, num_convs, norm, num_deformable,
                                      self.deformable_modulated)
        self.mask_tower_y = tower(in_channels + 1, conv_channels, num_convs, norm, num_deformable,
                                      self.deformable_modulated)
        self.mask_preds = self._xy_output_convs(conv_channels)

    def mask_towers(self):
        return [self.mask_tower_x, self.mask_tower_y]

    def mask_forward(self, feat, level):
        out = self.mask_preds[level]
        fx = upsample2x(self.mask_tower_x(coord_features(feat, "x")))
        fy = upsample2x(self.mask_tower_y(coord_features(feat, "y")))
        return torch.cat([out["x"](fx), out["y"](fy)], dim=1)
