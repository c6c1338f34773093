"""SOLOv2's unified mask feature: one stride-4 map built from the finest FPN levels, which every
cell's dynamic kernel is convolved with to form that cell's mask."""
from typing import List

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, get_norm
from torch import nn

from .layers import DeformConv, coord_features

__all__ = ["MaskFeatureHead"]


class MaskFeatureHead(nn.Module):
    """The unified mask feature branch of SOLOv2 (the official repository's ``MaskFeatHead``,
    mmdetection's ``MaskFeatModule``).

    Level i of the ``num_levels`` inputs (P2, P3, ... at strides 4, 8, ...) is brought to the
    finest level's size by ``max(i, 1)`` (3x3 conv, norm, ReLU) blocks, each but the first
    level's followed by a x2 bilinear upsample (align_corners=False); the *coarsest* level gets
    the two coordinate channels (x, y in [-1, 1],
    :func:`~solo_d2.modeling.layers.coord_features`) before its first conv. The levels are
    summed, then a 1x1 conv (norm, ReLU) gives ``out_channels`` channels.

    Input: ``num_levels`` tensors (N, in_channels, H_i, W_i), finest first, each twice the size
    of the next (FPN outputs of an input padded to a multiple of 32 are).
    Output: (N, out_channels, H_0, W_0) float.

    With ``deformable``, every conv (the 1x1 one too) is a
    :class:`~solo_d2.modeling.layers.DeformConv` (DCN v2 with ``modulated``), as in the published
    SOLOv2 R-101 DCN model (the reference's ``conv_cfg=dict(type='DCNv2')``).

    Parameters: ``levels.{i}.{j}`` (conv j of level i: ``weight``, ``norm.weight``, ``norm.bias``;
    ``bias`` instead of the norm when ``norm == ""``; ``conv_offset.weight`` / ``.bias`` when
    deformable), ``pred`` (the 1x1 conv, same layout).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        out_channels: int,
        num_levels: int = 4,
        norm: str = "GN",
        deformable: bool = False,
        modulated: bool = False,
    ):
        """
        Args:
            in_channels: channels of every input level.
            channels: channels of the per-level convs (``MODEL.SOLO.MASK_FEATURE_CHANNELS``).
            out_channels: channels of the unified feature, E (``MODEL.SOLO.MASK_FEATURE_DIM``).
            num_levels: how many of the finest input levels are used (>= 1).
            norm: norm after every conv ("GN", "" for none, or a detectron2 ``get_norm`` name).
            deformable: every conv deformable (:class:`~solo_d2.modeling.layers.DeformConv`).
            modulated: the deformable convs are DCN v2 (ignored without ``deformable``).
        """
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"MODEL.SOLO.MASK_FEATURE_NUM_LEVELS = {num_levels} must be >= 1")
        self.num_levels = num_levels

        def conv(cin, cout, k):
            if deformable:
                return DeformConv(cin, cout, k, bias=not norm, norm=get_norm(norm, cout),
                                  activation=F.relu, modulated=modulated)
            return Conv2d(cin, cout, kernel_size=k, padding=k // 2, bias=not norm,
                          norm=get_norm(norm, cout), activation=F.relu)

        self.levels = nn.ModuleList()
        for i in range(num_levels):
            cin = in_channels + (2 if i == num_levels - 1 and i > 0 else 0)
            convs = [conv(cin if j == 0 else channels, channels, 3) for j in range(max(i, 1))]
            self.levels.append(nn.ModuleList(convs))
        self.pred = conv(channels, out_channels, 1)

    def convs(self) -> List[nn.Module]:
        """Every conv of the branch (for initialisation)."""
        return [c for level in self.levels for c in level] + [self.pred]

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        if len(features) < self.num_levels:
            raise ValueError(
                f"MaskFeatureHead needs {self.num_levels} levels, got {len(features)}"
            )
        out = None
        for i, (x, convs) in enumerate(zip(features[: self.num_levels], self.levels)):
            if i == self.num_levels - 1 and i > 0:
                x = coord_features(x, "xy")
            for c in convs:
                x = c(x)
                if i > 0:
                    x = F.interpolate(x, scale_factor=2.0, mode="bilinear")
            out = x if out is None else out + x
        return self.pred(out)
