"""SOLO heads: the category branch, the CoordConv mask branch, and their output layers.

Both heads share everything (feature resizing, both towers, CoordConv, the category output,
initialisation) and differ only in the mask output layer and in how one cell's mask is formed:

- :class:`SOLOHead` (vanilla): a 1x1 conv with S^2 output channels per level; the mask of cell
  k = i*S + j is ``sigmoid(out[k])``.
- :class:`DecoupledSOLOHead`: two 1x1 convs with S channels each, X (indexed by column j) and
  Y (indexed by row i); the mask of cell (i, j) is ``sigmoid(X[j]) * sigmoid(Y[i])``.

Heads never materialise all S^2 masks in training or inference: ``forward`` returns the mask
*features* (the mask tower's output) and :meth:`SOLOHead.mask_probs` forms the masks of the cells
asked for (positive cells in training, candidates at inference). Because the 1x1 output conv is
linear per pixel, this equals running the full conv and then selecting channels.
:meth:`SOLOHead.full_mask_probs` materialises all S^2 masks, for tests and benchmarks.

The reference upsamples the tower output x2 and then applies the 1x1 output conv. Bilinear
upsampling mixes each channel's neighbouring pixels with weights that sum to 1 and the 1x1 conv
mixes channels at each pixel, so the two commute exactly (bias included): the heads apply the
output conv at the tower's resolution and upsample its output, a quarter of the pixels. Same
masks (a test compares with the reference order); a float32 training step of the shapes demo
went from 286-290 ms to 250 ms (BENCHMARKS.md, "Faster steps").
"""
import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.utils.registry import Registry
from fvcore.nn import weight_init
from torch import nn

from .layers import DeformConv3x3, coord_features

__all__ = ["SOLO_HEAD_REGISTRY", "SOLOHead", "DecoupledSOLOHead", "build_solo_head"]

SOLO_HEAD_REGISTRY = Registry("SOLO_HEAD")
SOLO_HEAD_REGISTRY.__doc__ = """
Registry for SOLO heads, selected by ``MODEL.SOLO.HEAD_TYPE``. A head is called with
``(cfg, input_shape: List[ShapeSpec])`` and follows :class:`SOLOHead`'s contract.
"""


def build_solo_head(cfg, input_shape: List[ShapeSpec]) -> nn.Module:
    name = cfg.MODEL.SOLO.HEAD_TYPE
    if name not in SOLO_HEAD_REGISTRY:
        known = ", ".join(sorted(k for k, _ in SOLO_HEAD_REGISTRY))
        raise ValueError(f"MODEL.SOLO.HEAD_TYPE = {name!r} is not a registered head ({known})")
    return SOLO_HEAD_REGISTRY.get(name)(cfg, input_shape)


def _tower(in_channels, channels, num_convs, norm, num_deformable) -> nn.Sequential:
    """``num_convs`` x (3x3 conv, norm, ReLU); the last ``num_deformable`` convs are deformable."""
    layers = []
    for i in range(num_convs):
        cin = in_channels if i == 0 else channels
        if i >= num_convs - num_deformable:
            conv = DeformConv3x3(cin, channels, bias=not norm)
        else:
            conv = nn.Conv2d(cin, channels, kernel_size=3, padding=1, bias=not norm)
        layers += [conv]
        if norm:
            layers += [get_norm(norm, channels)]
        layers += [nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


@SOLO_HEAD_REGISTRY.register()
class SOLOHead(nn.Module):
    """Vanilla SOLO head (S^2 mask channels per level).

    Contract of :meth:`forward`, for L levels with grid numbers S_l:

    - input: ``features``, L tensors (N, in_channels, H_l, W_l), finest first (P2..P6).
    - output: ``(cate_logits, mask_feats)``

      * ``cate_logits[l]``: (N, num_classes, S_l, S_l) float, category logits of each cell.
      * ``mask_feats[l]``: (N, conv_channels, h_l, w_l) float, the mask tower output, where
        (h_l, w_l) is the size of the resized level (P2 x0.5, last level to the size of the one
        before).

    :meth:`mask_probs` turns ``mask_feats[l]`` into the soft masks of chosen cells, of size
    :meth:`mask_size` = (2*h_l, 2*w_l): masks have strides [4, 4, 8, 16, 16] for P2..P6 inputs.
    """

    #: masks are this many times larger than the mask tower's output
    MASK_UPSAMPLE = 2

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        num_grids: List[int],
        conv_channels: int = 256,
        num_stacked_convs: int = 7,
        norm: str = "GN",
        num_deformable_convs: int = 0,
        prior_prob: float = 0.01,
        mask_prior_prob: float = 0.0,
        tower_init: str = "normal",
    ):
        """
        Args:
            num_classes: categories, without background.
            in_channels: channels of every input feature map.
            num_grids: S for each level.
            conv_channels: channels of the tower convs.
            num_stacked_convs: 3x3 convs in each tower.
            norm: tower normalisation ("GN", "" for none, or a detectron2 ``get_norm`` name).
            num_deformable_convs: how many of each tower's convs, counted from the last, are
                deformable (the reference light DCN model: 1).
            prior_prob: initial foreground probability of the category output (and of the mask
                outputs unless ``mask_prior_prob`` is given).
            mask_prior_prob: initial foreground probability of each mask output conv (for
                Decoupled SOLO: of X and of Y, so a cell's mask starts at its square);
                0 means ``prior_prob`` (the reference).
            tower_init: initialisation of the towers' 3x3 convs: "normal" (N(0, 0.01), the
                reference) or "msra" (He init, Detectron2's ``c2_msra_fill``). The output convs
                are N(0, 0.01) with the prior biases either way.
        """
        super().__init__()
        self.num_classes = num_classes
        self.num_grids = list(num_grids)
        if not 0 <= num_deformable_convs <= num_stacked_convs:
            raise ValueError(
                f"MODEL.SOLO.NUM_DEFORMABLE_CONVS = {num_deformable_convs} must be in "
                f"0..NUM_STACKED_CONVS ({num_stacked_convs})"
            )
        self.cate_tower = _tower(
            in_channels, conv_channels, num_stacked_convs, norm, num_deformable_convs
        )
        self.mask_tower = _tower(
            in_channels + 2, conv_channels, num_stacked_convs, norm, num_deformable_convs
        )
        self.cate_pred = nn.Conv2d(conv_channels, num_classes, kernel_size=3, padding=1)
        self.mask_preds = self._build_mask_outputs(conv_channels)

        if tower_init not in ("normal", "msra"):
            raise ValueError(f"MODEL.SOLO.TOWER_INIT = {tower_init!r}: expected 'normal' or 'msra'")
        for name, p in (("PRIOR_PROB", prior_prob), ("MASK_PRIOR_PROB", mask_prior_prob)):
            if not (0.0 < p < 1.0 or (name == "MASK_PRIOR_PROB" and p == 0.0)):
                raise ValueError(f"MODEL.SOLO.{name} = {p} must be in (0, 1)")
        mask_prior_prob = mask_prior_prob or prior_prob
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, DeformConv3x3):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        # After the loop, which also visits (and would re-fill) each offset conv: offsets start
        # at zero, so a deformable conv starts as a plain 3x3 conv.
        for m in self.modules():
            if isinstance(m, DeformConv3x3):
                nn.init.zeros_(m.conv_offset.weight)
                nn.init.zeros_(m.conv_offset.bias)
        if tower_init == "msra":
            # Direct children only: a deformable conv's offset conv stays at zero.
            for m in list(self.cate_tower) + list(self.mask_tower):
                if isinstance(m, (nn.Conv2d, DeformConv3x3)):
                    weight_init.c2_msra_fill(m)
        nn.init.constant_(self.cate_pred.bias, -math.log((1 - prior_prob) / prior_prob))
        for m in self._mask_output_convs():
            nn.init.constant_(m.bias, -math.log((1 - mask_prior_prob) / mask_prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(
                f"MODEL.SOLO.IN_FEATURES must all have the same number of channels, got {channels}"
            )
        return {
            "num_classes": cfg.MODEL.SOLO.NUM_CLASSES,
            "in_channels": channels.pop(),
            "num_grids": cfg.MODEL.SOLO.NUM_GRIDS,
            "conv_channels": cfg.MODEL.SOLO.CONV_CHANNELS,
            "num_stacked_convs": cfg.MODEL.SOLO.NUM_STACKED_CONVS,
            "norm": cfg.MODEL.SOLO.NORM,
            "num_deformable_convs": cfg.MODEL.SOLO.NUM_DEFORMABLE_CONVS,
            "prior_prob": cfg.MODEL.SOLO.PRIOR_PROB,
            "mask_prior_prob": cfg.MODEL.SOLO.MASK_PRIOR_PROB,
            "tower_init": cfg.MODEL.SOLO.TOWER_INIT,
        }

    # ---- the part that differs between head types -------------------------------------------
    def _build_mask_outputs(self, channels: int) -> nn.ModuleList:
        return nn.ModuleList(nn.Conv2d(channels, s * s, kernel_size=1) for s in self.num_grids)

    def _mask_output_convs(self) -> List[nn.Conv2d]:
        return list(self.mask_preds)

    def mask_probs(
        self, mask_feat: torch.Tensor, level: int, img_idx: torch.Tensor, cell_idx: torch.Tensor
    ) -> torch.Tensor:
        """Soft masks of chosen cells of one level.

        Args:
            mask_feat: (N, E, h, w) ``mask_feats[level]`` from :meth:`forward`.
            level: level index.
            img_idx: (K,) int64, image of each chosen cell.
            cell_idx: (K,) int64, cell index k = i * S + j of each chosen cell.
        Returns:
            (K, 2h, 2w) float in [0, 1], row r the mask of cell ``cell_idx[r]`` of image
            ``img_idx[r]``.
        """
        conv = self.mask_preds[level]
        n, e, h, w = mask_feat.shape
        weight = conv.weight.view(conv.out_channels, e)
        out = mask_feat.new_empty((img_idx.numel(), h * w))
        # Group by image (a loop over the batch, not over cells): one matmul per image.
        for b in torch.unique(img_idx).tolist():
            sel = (img_idx == b).nonzero().squeeze(1)
            cells = cell_idx[sel]
            logits = torch.addmm(conv.bias[cells, None], weight[cells], mask_feat[b].view(e, -1))
            out = out.index_put((sel,), logits)
        return _upsample(out.view(-1, 1, h, w))[:, 0].sigmoid()

    def full_mask_probs(self, mask_feat: torch.Tensor, level: int) -> torch.Tensor:
        """All S^2 soft masks of one level: (N, S^2, 2h, 2w), channel k = i * S + j.

        What reference implementations compute; solo_d2 only uses it in tests and benchmarks.
        """
        return _upsample(self.mask_preds[level](mask_feat)).sigmoid()

    def mask_size(self, mask_feat: torch.Tensor) -> Tuple[int, int]:
        """(H, W) of the masks :meth:`mask_probs` forms from ``mask_feat`` (N, E, h, w)."""
        h, w = mask_feat.shape[-2:]
        return (self.MASK_UPSAMPLE * h, self.MASK_UPSAMPLE * w)

    # ---- shared ------------------------------------------------------------------------------
    def mask_output_parameters(self) -> List[nn.Parameter]:
        """Parameters of the mask output layer(s), all levels."""
        return [p for m in self._mask_output_convs() for p in m.parameters()]

    def forward(self, features: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        if len(features) != len(self.num_grids):
            raise ValueError(
                f"SOLO head got {len(features)} feature maps for {len(self.num_grids)} grids"
            )
        feats = self.resize_features(features)
        cate_logits, mask_feats = [], []
        for feat, s in zip(feats, self.num_grids):
            mask_feats.append(self.mask_tower(coord_features(feat)))
            cate_feat = F.interpolate(feat, size=(s, s), mode="bilinear")
            cate_logits.append(self.cate_pred(self.cate_tower(cate_feat)))
        return cate_logits, mask_feats

    @staticmethod
    def resize_features(features: List[torch.Tensor]) -> List[torch.Tensor]:
        """P2 is resized to P3's size (x0.5) and the last level to the size of the one before."""
        feats = list(features)
        if len(feats) > 1:
            feats[0] = F.interpolate(feats[0], size=feats[1].shape[-2:], mode="bilinear")
            feats[-1] = F.interpolate(feats[-1], size=feats[-2].shape[-2:], mode="bilinear")
        return feats


@SOLO_HEAD_REGISTRY.register()
class DecoupledSOLOHead(SOLOHead):
    """Decoupled SOLO head: X and Y output convs of S channels each per level.

    Same contract as :class:`SOLOHead`. The mask of cell (i, j) is sigmoid(X_j) * sigmoid(Y_i);
    it is a probability already, so the dice loss takes it without another sigmoid.
    The tower is the one :class:`SOLOHead` uses (shared by X and Y); the reference
    implementation gives X and Y separate towers, each with one coordinate channel.
    """

    def _build_mask_outputs(self, channels: int) -> nn.ModuleList:
        return nn.ModuleList(
            nn.ModuleDict(
                {
                    "x": nn.Conv2d(channels, s, kernel_size=1),
                    "y": nn.Conv2d(channels, s, kernel_size=1),
                }
            )
            for s in self.num_grids
        )

    def _mask_output_convs(self) -> List[nn.Conv2d]:
        return [m[k] for m in self.mask_preds for k in ("x", "y")]

    def _xy_probs(self, mask_feat: torch.Tensor, level: int):
        """X and Y probabilities, (N, S, 2h, 2w) each, from ``mask_feat`` (N, E, h, w)."""
        out = self.mask_preds[level]
        s = self.num_grids[level]
        xy = F.conv2d(
            mask_feat,
            torch.cat([out["x"].weight, out["y"].weight]),
            torch.cat([out["x"].bias, out["y"].bias]),
        )  # one 1x1 conv with 2S channels
        return _upsample(xy).sigmoid().split(s, dim=1)

    def mask_probs(self, mask_feat, level, img_idx, cell_idx):
        s = self.num_grids[level]
        px, py = self._xy_probs(mask_feat, level)  # (N, S, 2h, 2w) each; cheap: 2S channels
        return px[img_idx, cell_idx % s] * py[img_idx, cell_idx // s]

    def full_mask_probs(self, mask_feat, level):
        px, py = self._xy_probs(mask_feat, level)
        n, s, h, w = px.shape
        return (py[:, :, None] * px[:, None, :]).view(n, s * s, h, w)


def _upsample(x: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, 2h, 2w), bilinear (align_corners=False), as the reference's x2
    upsample of the mask tower output."""
    return F.interpolate(x, scale_factor=float(SOLOHead.MASK_UPSAMPLE), mode="bilinear")
