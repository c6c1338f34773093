"""The SOLO head contract, its shared base (category branch, feature resizing, initialisation) and
the vanilla SOLO head.

Every head type (``MODEL.SOLO.HEAD_TYPE``) shares the category branch, the resizing of the input
levels, the CoordConv mask input and the initialisation, and differs only in its mask branch:

- :class:`SOLOHead` (vanilla SOLO): one mask tower, a 1x1 output conv with S^2 channels per level;
  the mask of cell k = i*S + j is ``sigmoid(out[k])``.
- :class:`~solo_d2.modeling.decoupled_solo_head.DecoupledSOLOHead` (published Decoupled SOLO):
  separate X and Y mask towers, 3x3 X and Y output convs of S channels each after the x2 upsample;
  the mask of cell (i, j) is ``sigmoid(X[j]) * sigmoid(Y[i])``.
- :class:`~solo_d2.modeling.decoupled_solo_light_head.DecoupledSOLOLightHead` (published Decoupled
  SOLO light): one mask tower shared by X and Y, 3x3 X and Y output convs after the upsample.

Heads never materialise all S^2 masks of vanilla SOLO in training or inference: ``forward``
returns per-level *mask features* and :meth:`BaseSOLOHead.mask_probs` forms the masks of the cells
asked for (positive cells in training, candidates at inference).
:meth:`BaseSOLOHead.full_mask_probs` forms all S^2 masks, for tests and benchmarks.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.utils.registry import Registry
from fvcore.nn import weight_init
from torch import nn

from .layers import DeformConv, DeformConv3x3, coord_features, solo_cfg_args

__all__ = ["SOLO_HEAD_REGISTRY", "BaseSOLOHead", "SOLOHead", "build_solo_head"]

#: Values of ``MODEL.SOLO.CATE_ALIGN`` (:meth:`BaseSOLOHead.cate_input`).
CATE_ALIGN_MODES = ("bilinear", "adaptive_pool", "region_grid")

SOLO_HEAD_REGISTRY = Registry("SOLO_HEAD")
SOLO_HEAD_REGISTRY.__doc__ = """
Registry for SOLO heads, selected by ``MODEL.SOLO.HEAD_TYPE``. A head is called with
``(cfg, input_shape: List[ShapeSpec])`` and follows :class:`BaseSOLOHead`'s contract.
"""


def build_solo_head(cfg, input_shape: List[ShapeSpec]) -> nn.Module:
    name = cfg.MODEL.SOLO.HEAD_TYPE
    if name not in SOLO_HEAD_REGISTRY:
        known = ", ".join(sorted(k for k, _ in SOLO_HEAD_REGISTRY))
        raise ValueError(f"MODEL.SOLO.HEAD_TYPE = {name!r} is not a registered head ({known})")
    return SOLO_HEAD_REGISTRY.get(name)(cfg, input_shape)


def tower(in_channels, channels, num_convs, norm, num_deformable, modulated=False) -> nn.Sequential:
    """``num_convs`` x (3x3 conv, norm, ReLU); the last ``num_deformable`` convs are deformable
    (DCN v1, or DCN v2 with ``modulated``).

    Parameter names (the contract with ``tools/convert_weights.py``): conv i is module ``3*i`` and
    its norm ``3*i + 1`` (with ``norm == ""``: conv i is ``2*i``, no norm). Convs followed by a
    norm have no bias.
    """
    layers = []
    for i in range(num_convs):
        cin = in_channels if i == 0 else channels
        if i >= num_convs - num_deformable:
            conv = DeformConv3x3(cin, channels, bias=not norm, modulated=modulated)
        else:
            conv = nn.Conv2d(cin, channels, kernel_size=3, padding=1, bias=not norm)
        layers += [conv]
        if norm:
            layers += [get_norm(norm, channels)]
        layers += [nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, 2h, 2w), bilinear (align_corners=False): the reference's x2 upsample
    of the mask tower output (``scale_factor=2``, so the output is exactly twice the input)."""
    return F.interpolate(x, scale_factor=2.0, mode="bilinear")


def resize_probs(probs: torch.Tensor, out_size: Optional[Tuple[int, int]]) -> torch.Tensor:
    """(K, H, W) -> (K, *out_size), bilinear; unchanged when ``out_size`` is None or equal."""
    if out_size is None or tuple(probs.shape[-2:]) == tuple(out_size):
        return probs
    return F.interpolate(probs[:, None], size=tuple(out_size), mode="bilinear")[:, 0]


class BaseSOLOHead(nn.Module):
    """What all SOLO heads share; subclasses build the mask branch and form the masks.

    Contract of :meth:`forward`, for L levels with grid numbers S_l:

    - input: ``features``, L tensors (N, in_channels, H_l, W_l), finest first (P2..P6).
    - output: ``(cate_logits, mask_feats)``

      * ``cate_logits[l]``: (N, num_classes, S_l, S_l) float, category logits of each cell.
      * ``mask_feats[l]``: float (N, E_l, h_l, w_l), the level's mask features: whatever the head
        forms masks from (vanilla SOLO: the mask tower output; Decoupled SOLO: the X and Y
        logits), or a tuple of such tensors, each with the batch first (SOLOv2: the level's
        kernels and the unified mask feature). Only :meth:`mask_probs`,
        :meth:`full_mask_probs` and :meth:`mask_size` interpret them; :meth:`mask_feat_tensors`
        and :meth:`image_mask_feat` handle either form.

    Levels are resized first (P2 x0.5 to P3's size, the last level to the size of the one before),
    so masks have strides [4, 4, 8, 16, 16] for P2..P6 inputs: the mask tower runs at the resized
    level's size and its output is upsampled x2.
    """

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
        deformable_modulated: bool = False,
        prior_prob: float = 0.01,
        mask_prior_prob: float = 0.0,
        tower_init: str = "normal",
        cate_align: str = "bilinear",
    ):
        """
        Args:
            num_classes: categories, without background.
            in_channels: channels of every input feature map.
            num_grids: S for each level.
            conv_channels: channels of the tower convs.
            num_stacked_convs: 3x3 convs in each tower.
            norm: tower normalisation ("GN", "" for none, or a detectron2 ``get_norm`` name).
            num_deformable_convs: how many of each tower's convs (category and mask towers),
                counted from the last, are deformable (the reference light DCN head: 1).
            deformable_modulated: the deformable tower convs are DCN v2 (modulated) instead of
                DCN v1 (the published SOLOv2 DCN models).
            prior_prob: initial foreground probability of the category output (and of the mask
                outputs unless ``mask_prior_prob`` is given).
            mask_prior_prob: initial foreground probability of each mask output conv (for
                Decoupled SOLO: of X and of Y, so a cell's mask starts at its square);
                0 means ``prior_prob`` (the reference).
            tower_init: initialisation of the towers' 3x3 convs: "normal" (N(0, 0.01), the
                reference) or "msra" (He init, Detectron2's ``c2_msra_fill``). The output convs
                are N(0, 0.01) with the prior biases either way.
            cate_align: how a level's feature is brought to the S x S category grid
                (:meth:`cate_input`): "bilinear", "adaptive_pool" or "region_grid".
        """
        super().__init__()
        self.num_classes = num_classes
        self.num_grids = list(num_grids)
        if not 0 <= num_deformable_convs <= num_stacked_convs:
            raise ValueError(
                f"MODEL.SOLO.NUM_DEFORMABLE_CONVS = {num_deformable_convs} must be in "
                f"0..NUM_STACKED_CONVS ({num_stacked_convs})"
            )
        if tower_init not in ("normal", "msra"):
            raise ValueError(f"MODEL.SOLO.TOWER_INIT = {tower_init!r}: expected 'normal' or 'msra'")
        if cate_align not in CATE_ALIGN_MODES:
            raise ValueError(
                f"MODEL.SOLO.CATE_ALIGN = {cate_align!r}: expected one of {', '.join(CATE_ALIGN_MODES)}"
            )
        self.cate_align = cate_align
        for name, p in (("PRIOR_PROB", prior_prob), ("MASK_PRIOR_PROB", mask_prior_prob)):
            if not (0.0 < p < 1.0 or (name == "MASK_PRIOR_PROB" and p == 0.0)):
                raise ValueError(f"MODEL.SOLO.{name} = {p} must be in (0, 1)")

        # A plain attribute read by the subclasses' _build_mask_branch.
        self.deformable_modulated = bool(deformable_modulated)
        self.cate_tower = tower(
            in_channels, conv_channels, num_stacked_convs, norm, num_deformable_convs,
            self.deformable_modulated,
        )
        self.cate_pred = nn.Conv2d(conv_channels, num_classes, kernel_size=3, padding=1)
        self._build_mask_branch(in_channels, conv_channels, num_stacked_convs, norm, num_deformable_convs)
        self._init_weights(prior_prob, mask_prior_prob or prior_prob, tower_init)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(
                f"MODEL.SOLO.IN_FEATURES must all have the same number of channels, got {channels}"
            )
        return {
            "in_channels": channels.pop(),
            **solo_cfg_args(cfg, "NUM_CLASSES", "NUM_GRIDS", "CONV_CHANNELS", "NUM_STACKED_CONVS", "NORM",
                            "NUM_DEFORMABLE_CONVS", "DEFORMABLE_MODULATED", "PRIOR_PROB",
                            "MASK_PRIOR_PROB", "TOWER_INIT", "CATE_ALIGN"),
        }

    def _init_weights(self, prior_prob: float, mask_prior_prob: float, tower_init: str):
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, DeformConv)):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        # After the loop, which also visits (and would re-fill) each offset conv: offsets start
        # at zero, so a deformable conv starts as a plain 3x3 conv.
        for m in self.modules():
            if isinstance(m, DeformConv):
                nn.init.zeros_(m.conv_offset.weight)
                nn.init.zeros_(m.conv_offset.bias)
        if tower_init == "msra":
            # The towers' direct children only: a deformable conv's offset conv stays at zero.
            for t in [self.cate_tower, *self.mask_towers()]:
                for m in t:
                    if isinstance(m, (nn.Conv2d, DeformConv)):
                        weight_init.c2_msra_fill(m)
        nn.init.constant_(self.cate_pred.bias, -math.log((1 - prior_prob) / prior_prob))
        for m in self.mask_output_convs():
            nn.init.constant_(m.bias, -math.log((1 - mask_prior_prob) / mask_prior_prob))

    # ---- what a head type defines -------------------------------------------------------------
    def _build_mask_branch(self, in_channels, conv_channels, num_convs, norm, num_deformable):
        """Create the mask tower(s) and the per-level output convs."""
        raise NotImplementedError

    def mask_towers(self) -> List[nn.Sequential]:
        """The mask tower(s), for initialisation."""
        raise NotImplementedError

    def mask_output_convs(self) -> List[nn.Module]:
        """The mask output convs of all levels (prior-bias initialised)."""
        raise NotImplementedError

    def mask_forward(self, feat: torch.Tensor, level: int) -> torch.Tensor:
        """``mask_feats[level]`` from the resized level ``feat`` (N, in_channels, h, w)."""
        raise NotImplementedError

    def mask_probs(
        self,
        mask_feat: torch.Tensor,
        level: int,
        img_idx: torch.Tensor,
        cell_idx: torch.Tensor,
        out_size: Optional[Tuple[int, int]] = None,
    ) -> torch.Tensor:
        """Soft masks of chosen cells of one level.

        Args:
            mask_feat: ``mask_feats[level]`` from :meth:`forward`.
            level: level index.
            img_idx: (K,) int64, image of each chosen cell.
            cell_idx: (K,) int64, cell index k = i * S + j of each chosen cell.
            out_size: (H, W) to resize the masks to (bilinear), as the reference does at
                inference to compare all levels at the finest mask size; None keeps
                :meth:`mask_size`. Each head resizes where the reference does (vanilla: the
                mask probability; Decoupled: sigmoid(X) and sigmoid(Y) before their product).
        Returns:
            (K, H, W) float in [0, 1], row r the mask of cell ``cell_idx[r]`` of image
            ``img_idx[r]``; (H, W) = ``out_size`` or :meth:`mask_size`.
        """
        raise NotImplementedError

    def full_mask_probs(self, mask_feat: torch.Tensor, level: int) -> torch.Tensor:
        """All S^2 soft masks of one level: (N, S^2, H, W), channel k = i * S + j, (H, W) =
        :meth:`mask_size`. What reference implementations compute; solo_d2 only uses it in tests
        and benchmarks."""
        raise NotImplementedError

    def mask_size(self, mask_feat: torch.Tensor) -> Tuple[int, int]:
        """(H, W) of the masks :meth:`mask_probs` forms from ``mask_feat`` (twice the resized
        level's size)."""
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------------
    def mask_output_parameters(self) -> List[nn.Parameter]:
        """Parameters of the mask output layer(s), all levels."""
        return [p for m in self.mask_output_convs() for p in m.parameters()]

    def forward(self, features: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        if len(features) != len(self.num_grids):
            raise ValueError(
                f"SOLO head got {len(features)} feature maps for {len(self.num_grids)} grids"
            )
        feats = self.resize_features(features)
        cate_logits, mask_feats = [], []
        for level, (feat, s) in enumerate(zip(feats, self.num_grids)):
            # Inputs may be channels-last (MODEL.SOLO.CHANNELS_LAST: the towers run in it);
            # outputs are standard-layout tensors.
            mask_feats.append(self.mask_forward(feat, level).contiguous())
            cate_feat = self.cate_input(feat, s)
            cate_logits.append(self.cate_pred(self.cate_tower(cate_feat)).contiguous())
        return cate_logits, mask_feats

    def cate_input(self, feat: torch.Tensor, s: int) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, S, S): the level's feature aligned to the category grid, the
        three ways of the SOLO paper's ablation (``MODEL.SOLO.CATE_ALIGN``):

        - "bilinear": bilinear interpolation (align_corners=False): each cell's feature is the
          feature sampled at the cell's centre (the reference);
        - "adaptive_pool": 2D adaptive max-pooling of the H x W feature to S x S (each cell the
          maximum over the feature pixels its region overlaps);
        - "region_grid": region-grid interpolation: each cell's feature is the average of
          bilinear samples on a regular k x k grid of points inside the cell (the centres of its
          k x k sub-cells), k = ceil(max(H, W) / S) so the points are at least as dense as the
          feature pixels; computed as bilinear interpolation to (kS, kS) then k x k average
          pooling.

        SOLOv2's kernel branch aligns its input (feature and coordinates) the same way.
        """
        if self.cate_align == "bilinear":
            return F.interpolate(feat, size=(s, s), mode="bilinear")
        if self.cate_align == "adaptive_pool":
            return F.adaptive_max_pool2d(feat, (s, s))
        k = max(1, math.ceil(max(feat.shape[-2:]) / s))
        return F.avg_pool2d(F.interpolate(feat, size=(k * s, k * s), mode="bilinear"), k)

    # ---- mask features as a whole (a tensor, or a tuple of tensors for SOLOv2) -------------------
    @staticmethod
    def mask_feat_tensors(mask_feat) -> List[torch.Tensor]:
        """The tensors of one level's ``mask_feats`` entry (to keep them in the graph)."""
        return list(mask_feat) if isinstance(mask_feat, tuple) else [mask_feat]

    @staticmethod
    def image_mask_feat(mask_feat, b: int):
        """One level's ``mask_feats`` entry for image ``b`` alone (a batch of one)."""
        if isinstance(mask_feat, tuple):
            return tuple(t[b : b + 1] for t in mask_feat)
        return mask_feat[b : b + 1]

    @staticmethod
    def rows_per_image(num_images: int, img_idx: torch.Tensor, form, like: torch.Tensor) -> torch.Tensor:
        """Rows of cells of several images, formed one image at a time: ``form(b, sel)`` returns
        the rows of the cells ``sel`` (an index into ``img_idx``) of image ``b``; the result has
        row r for cell r. A loop over the batch (not over cells, nor over the values of
        ``img_idx``, so that it exports); one image (inference) is formed in one call,
        ``sel = slice(None)``."""
        if num_images == 1:
            return form(0, slice(None))
        out = None
        for b in range(num_images):
            sel = (img_idx == b).nonzero().squeeze(1)
            rows = form(b, sel).to(like.dtype)
            if out is None:
                out = rows.new_empty((img_idx.numel(), *rows.shape[1:]))
            out = out.index_put((sel,), rows)
        return out

    @staticmethod
    def resize_features(features: List[torch.Tensor]) -> List[torch.Tensor]:
        """P2 is resized to P3's size (x0.5) and the last level to the size of the one before."""
        feats = list(features)
        if len(feats) > 1:
            feats[0] = F.interpolate(feats[0], size=feats[1].shape[-2:], mode="bilinear")
            feats[-1] = F.interpolate(feats[-1], size=feats[-2].shape[-2:], mode="bilinear")
        return feats


@SOLO_HEAD_REGISTRY.register()
class SOLOHead(BaseSOLOHead):
    """Vanilla SOLO head: one CoordConv mask tower (both coordinate channels), then per level a
    1x1 conv with S^2 output channels; the mask of cell k = i*S + j is ``sigmoid(out[k])``.

    ``mask_feats[l]`` is the mask tower output (N, conv_channels, h_l, w_l); masks are
    (2 h_l, 2 w_l).

    The reference upsamples the tower output x2 and then applies the 1x1 output conv. Bilinear
    upsampling mixes each channel's neighbouring pixels with weights that sum to 1 and the 1x1
    conv mixes channels at each pixel, so the two commute exactly (bias included): this head
    applies the output conv, for the chosen cells only, at the tower's resolution and upsamples
    the result, a quarter of the pixels (a test compares with the reference order).

    Parameters: ``cate_tower``, ``cate_pred``, ``mask_tower``, ``mask_preds.{l}`` (1x1, S_l^2
    channels).
    """

    def _build_mask_branch(self, in_channels, conv_channels, num_convs, norm, num_deformable):
        self.mask_tower = tower(
            in_channels + 2, conv_channels, num_convs, norm, num_deformable, self.deformable_modulated
        )
        self.mask_preds = nn.ModuleList(
            nn.Conv2d(conv_channels, s * s, kernel_size=1) for s in self.num_grids
        )

    def mask_towers(self):
        return [self.mask_tower]

    def mask_output_convs(self):
        return list(self.mask_preds)

    def mask_forward(self, feat, level):
        return self.mask_tower(coord_features(feat, "xy"))

    def mask_probs(self, mask_feat, level, img_idx, cell_idx, out_size=None):
        conv = self.mask_preds[level]
        n, e, h, w = mask_feat.shape
        weight = conv.weight.view(conv.out_channels, e)

        def form(b, sel):  # one matmul per image, of its cells (possibly none)
            cells = cell_idx[sel]
            return torch.addmm(conv.bias[cells, None], weight[cells], mask_feat[b].view(e, -1))

        out = self.rows_per_image(n, img_idx, form, mask_feat)
        probs = upsample2x(out.view(-1, 1, h, w))[:, 0].sigmoid()
        return resize_probs(probs, out_size)

    def full_mask_probs(self, mask_feat, level):
        return upsample2x(self.mask_preds[level](mask_feat)).sigmoid()

    def mask_size(self, mask_feat):
        h, w = mask_feat.shape[-2:]
        return (2 * h, 2 * w)
