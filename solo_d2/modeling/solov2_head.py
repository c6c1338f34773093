"""SOLOv2: each cell predicts a dynamic kernel, and its mask is that kernel convolved with one
unified mask feature shared by all levels (Wang et al., "SOLOv2: Dynamic and Fast Instance
Segmentation", NeurIPS 2020)."""
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from fvcore.nn import weight_init
from torch import nn

from .layers import coord_features, host_reads_are_free, solo_cfg_args
from .mask_feature_head import MaskFeatureHead
from .solo_head import SOLO_HEAD_REGISTRY, BaseSOLOHead, resize_probs, tower

__all__ = ["SOLOv2Head"]


@SOLO_HEAD_REGISTRY.register()
class SOLOv2Head(BaseSOLOHead):
    """SOLOv2 as published (the official repository's ``SOLOv2Head`` + ``MaskFeatHead``,
    mmdetection 3.3.0's ``SOLOV2Head`` + ``MaskFeatModule``).

    - Category branch: the base class's (level resized to S x S, tower, 3x3 conv).
    - Kernel branch: the level's feature plus the two coordinate channels (computed at the
      level's size), resized to S x S like the category input, a tower of ``num_stacked_convs``
      3x3 convs (``kernel_tower``) and a 3x3 conv (``kernel_pred``) giving every cell a kernel of
      D = E * k * k values (E = ``mask_feature_dim``, k = ``dynamic_kernel_size``).
    - Mask feature branch (:class:`MaskFeatureHead`, ``mask_feature``): one (N, E, H/4, W/4) map
      from the raw (not resized) finest ``mask_feature_num_levels`` inputs (P2-P5).
    - Mask of cell k = i*S + j of image n: ``sigmoid(conv(F[n], kernel[n, :, i, j]))``, a k x k
      convolution (padding k // 2) of the unified feature F with that cell's kernel viewed as
      (1, E, k, k); for k = 1 (the published models) a dot product at every pixel.

    ``mask_feats[l]`` is the tuple ``(kernels_l, F)``: kernels_l (N, D, S_l, S_l) float and the
    unified feature F (N, E, H, W) float, the same tensor on every level. Masks of every level are
    (H, W), stride 4 (so are the training targets, as in the reference). Only the requested cells'
    masks are formed.

    Parameters: ``cate_tower``, ``cate_pred``, ``kernel_tower``, ``kernel_pred``,
    ``mask_feature.levels.{i}.{j}``, ``mask_feature.pred``.
    """

    @configurable
    def __init__(
        self,
        *,
        mask_feature_channels: int = 128,
        mask_feature_dim: int = 256,
        mask_feature_num_levels: int = 4,
        dynamic_kernel_size: int = 1,
        mask_feature_deformable: bool = False,
        **kwargs,
    ):
        """
        Args:
            mask_feature_channels: channels of the mask feature branch's per-level convs.
            mask_feature_dim: E, channels of the unified mask feature.
            mask_feature_num_levels: finest input levels the mask feature is built from.
            dynamic_kernel_size: k, odd; each kernel has E * k * k values.
            mask_feature_deformable: every conv of the mask feature branch deformable, DCN v2
                when ``deformable_modulated`` (the published R-101 DCN model).
            kwargs: :class:`BaseSOLOHead`'s arguments (``conv_channels``,
                ``num_stacked_convs``, ``num_deformable_convs`` and ``norm`` apply to both the
                category and the kernel tower; ``norm`` also to the mask feature branch).
        """
        for name, v in (
            ("MASK_FEATURE_CHANNELS", mask_feature_channels),
            ("MASK_FEATURE_DIM", mask_feature_dim),
        ):
            if v < 1:
                raise ValueError(f"MODEL.SOLO.{name} = {v} must be >= 1")
        if dynamic_kernel_size < 1 or dynamic_kernel_size % 2 == 0:
            raise ValueError(
                f"MODEL.SOLO.DYNAMIC_KERNEL_SIZE = {dynamic_kernel_size} must be a positive odd "
                "number (the mask keeps the feature's size)"
            )
        num_levels = len(kwargs.get("num_grids", []))
        if not 1 <= mask_feature_num_levels <= num_levels:
            raise ValueError(
                f"MODEL.SOLO.MASK_FEATURE_NUM_LEVELS = {mask_feature_num_levels} must be in "
                f"1..{num_levels} (the number of MODEL.SOLO.IN_FEATURES)"
            )
        if kwargs.get("mask_prior_prob", 0.0):
            raise ValueError(
                "MODEL.SOLO.MASK_PRIOR_PROB does not apply to SOLOv2Head (its mask output is a "
                "kernel, not a mask logit): leave it at 0"
            )
        # Plain attributes read by _build_mask_branch, which the base __init__ calls.
        self.mask_feature_dim = mask_feature_dim
        self.dynamic_kernel_size = dynamic_kernel_size
        self._mask_feature_args = (mask_feature_channels, mask_feature_num_levels,
                                   bool(mask_feature_deformable))
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {
            **BaseSOLOHead.from_config(cfg, input_shape),
            **solo_cfg_args(cfg, "MASK_FEATURE_CHANNELS", "MASK_FEATURE_DIM", "MASK_FEATURE_NUM_LEVELS",
                            "DYNAMIC_KERNEL_SIZE", "MASK_FEATURE_DEFORMABLE"),
        }

    def _build_mask_branch(self, in_channels, conv_channels, num_convs, norm, num_deformable):
        k = self.dynamic_kernel_size
        self.kernel_tower = tower(in_channels + 2, conv_channels, num_convs, norm, num_deformable,
                                      self.deformable_modulated)
        self.kernel_pred = nn.Conv2d(
            conv_channels, self.mask_feature_dim * k * k, kernel_size=3, padding=1
        )
        channels, num_levels, deformable = self._mask_feature_args
        self.mask_feature = MaskFeatureHead(
            in_channels, channels, self.mask_feature_dim, num_levels, norm,
            deformable=deformable, modulated=self.deformable_modulated,
        )

    def _init_weights(self, prior_prob, mask_prior_prob, tower_init):
        super()._init_weights(prior_prob, mask_prior_prob, tower_init)
        # The kernel conv's bias starts at 0 (the reference): it is not a mask logit.
        nn.init.zeros_(self.kernel_pred.bias)
        if tower_init == "msra":
            for m in self.mask_feature.convs():
                weight_init.c2_msra_fill(m)

    def mask_towers(self):
        return [self.kernel_tower]

    def mask_output_convs(self):
        return [self.kernel_pred]

    def forward(self, features):
        if len(features) != len(self.num_grids):
            raise ValueError(
                f"SOLO head got {len(features)} feature maps for {len(self.num_grids)} grids"
            )
        unified = self.mask_feature(features).contiguous()
        cate_logits, kernels = super().forward(features)
        return cate_logits, [(k, unified) for k in kernels]

    def mask_forward(self, feat, level):
        # Coordinates at the level's own size, resized to the grid with the feature (the
        # reference's order; resizing is per channel, so the feature part equals the category
        # branch's input).
        x = self.cate_input(coord_features(feat, "xy"), self.num_grids[level])
        return self.kernel_pred(self.kernel_tower(x))

    def _masks(self, kernels: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """(K, D) kernels on one image's (1, E, H, W) feature -> (K, H, W) mask logits."""
        e, k = self.mask_feature_dim, self.dynamic_kernel_size
        h, w = feat.shape[-2:]
        if k == 1:
            return (kernels @ feat.reshape(e, h * w)).view(-1, h, w)
        return F.conv2d(feat, kernels.reshape(-1, e, k, k), padding=k // 2)[0]

    def mask_probs(self, mask_feat, level, img_idx, cell_idx, out_size=None):
        kernels, feat = mask_feat
        s2 = kernels.shape[-2] * kernels.shape[-1]
        exporting = torch.compiler.is_exporting()
        if not exporting and not host_reads_are_free(kernels.device):
            # Every requested cell's mask (a cell above the threshold for two classes twice): no
            # host read of the cells (a sync per level on an accelerator).
            chosen = kernels.flatten(2)[img_idx, :, cell_idx]  # (K, D)
            out = self.rows_per_image(
                kernels.shape[0], img_idx,
                lambda b, sel: self._masks(chosen[sel], feat[b : b + 1]), feat,
            )
            return resize_probs(out.sigmoid(), out_size)
        # CPU (and exported graphs): each distinct (image, cell) once: at inference one cell is
        # a candidate for every class above the score threshold.
        key, inverse = torch.unique(img_idx * s2 + cell_idx, return_inverse=True)
        img_u, cell_u = key // s2, key % s2
        chosen = kernels.flatten(2)[img_u, :, cell_u]  # (U, D)
        out = self.rows_per_image(
            kernels.shape[0], img_u, lambda b, sel: self._masks(chosen[sel], feat[b : b + 1]), feat
        )
        probs = resize_probs(out.sigmoid(), out_size)
        if not exporting and torch.equal(
            inverse, torch.arange(inverse.numel(), device=inverse.device)
        ):
            return probs  # the cells were distinct and in order: no gather (eager)
        return probs[inverse]

    def full_mask_probs(self, mask_feat, level):
        kernels, feat = mask_feat
        n, d = kernels.shape[:2]
        per_cell = kernels.flatten(2).transpose(1, 2)  # (N, S^2, D)
        return torch.stack([self._masks(per_cell[b], feat[b : b + 1]) for b in range(n)]).sigmoid()

    def mask_size(self, mask_feat):
        return tuple(mask_feat[1].shape[-2:])
