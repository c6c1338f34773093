"""Decoupled SOLO with one mask tower shared by X and Y: the published light head, and
solo_d2's compact variant of it."""
from .decoupled_solo_head import BaseDecoupledSOLOHead
from .layers import coord_features
from .solo_head import SOLO_HEAD_REGISTRY, tower, upsample2x

__all__ = ["DecoupledSOLOLightHead", "DecoupledSOLOCompactHead"]


@SOLO_HEAD_REGISTRY.register()
class DecoupledSOLOLightHead(BaseDecoupledSOLOHead):
    """Decoupled SOLO light as published (the official repository's ``DecoupledSOLOLightHead``,
    mmdetection's ``DecoupledSOLOLightHead``).

    One CoordConv mask tower (both coordinate channels, x then y) shared by X and Y; its output
    is upsampled x2 and then goes through the 3x3 X and Y output convs (S channels each). The
    published light models use 4 stacked convs (``MODEL.SOLO.NUM_STACKED_CONVS``); the DCN
    variant makes the *last* conv of both the mask and the category tower deformable
    (``MODEL.SOLO.NUM_DEFORMABLE_CONVS 1``).

    Parameters: ``cate_tower``, ``cate_pred``, ``mask_tower``, ``mask_preds.{l}.x``,
    ``mask_preds.{l}.y``.
    """

    def _build_mask_branch(self, in_channels, conv_channels, num_convs, norm, num_deformable):
        self.mask_tower = tower(in_channels + 2, conv_channels, num_convs, norm, num_deformable,
                                      self.deformable_modulated)
        self.mask_preds = self._xy_output_convs(conv_channels)

    def mask_towers(self):
        return [self.mask_tower]

    def mask_forward(self, feat, level):
        return self._xy_conv(upsample2x(self.mask_tower(coord_features(feat, "xy"))), level)


@SOLO_HEAD_REGISTRY.register()
class DecoupledSOLOCompactHead(DecoupledSOLOLightHead):
    """solo_d2's own decoupled variant (not a published architecture; no published checkpoint
    loads into it): the light head's shared tower with *1x1* X and Y output convs, applied before
    the x2 upsample. A 1x1 conv and the bilinear upsample commute exactly (the upsample's weights
    sum to 1), so this is the light head with 1x1 output convs, computed on a quarter of the
    pixels.

    Parameters: as :class:`DecoupledSOLOLightHead` (``mask_preds.{l}.x`` / ``.y`` are 1x1).
    """

    OUTPUT_KERNEL = 1

    def mask_forward(self, feat, level):
        return upsample2x(self._xy_conv(self.mask_tower(coord_features(feat, "xy")), level))
