"""A narrow ResNet-18/34-FPN backbone for small CPU models (the built-in shapes demo).

Detectron2's ``build_resnet_backbone`` insists on ``RES2_OUT_CHANNELS = 64`` for ResNet-18/34.
:func:`build_narrow_resnet_fpn_backbone` builds the same network out of Detectron2's own parts
(``BasicStem``, ``BasicBlock``, ``ResNet``, ``FPN``, ``LastLevelMaxPool``) but takes any width:
the stem has ``MODEL.RESNETS.STEM_OUT_CHANNELS`` channels, res2 ``RES2_OUT_CHANNELS``, and each
later stage twice the one before. With the default 64/64 it equals Detectron2's
``build_resnet_fpn_backbone`` at depth 18/34 (same modules, same parameter names), so
checkpoints are interchangeable.

Select it with ``MODEL.BACKBONE.NAME: "build_narrow_resnet_fpn_backbone"``.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem

__all__ = ["build_narrow_resnet_backbone", "build_narrow_resnet_fpn_backbone"]

_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


def build_narrow_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """ResNet-18/34 (``BasicBlock``) of any width, from ``MODEL.RESNETS`` and
    ``MODEL.BACKBONE.FREEZE_AT``.

    Raises ``ValueError`` naming the key for a depth other than 18/34 or a width < 1.
    """
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in _BLOCKS_PER_STAGE:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH = {r.DEPTH}: build_narrow_resnet_fpn_backbone supports 18 and "
            "34 (use build_resnet_fpn_backbone for deeper ResNets)"
        )
    for key in ("STEM_OUT_CHANNELS", "RES2_OUT_CHANNELS"):
        if int(r[key]) < 1:
            raise ValueError(f"MODEL.RESNETS.{key} = {r[key]} must be >= 1")
    stem = BasicStem(
        in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=r.NORM
    )
    stages = []
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    for idx, num_blocks in enumerate(_BLOCKS_PER_STAGE[r.DEPTH]):
        first_stride = 1 if idx == 0 else 2
        stages.append(
            ResNet.make_stage(
                block_class=BasicBlock,
                num_blocks=num_blocks,
                stride_per_block=[first_stride] + [1] * (num_blocks - 1),
                in_channels=in_channels,
                out_channels=out_channels,
                norm=r.NORM,
            )
        )
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(
        stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT
    )


@BACKBONE_REGISTRY.register()
def build_narrow_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """:func:`build_narrow_resnet_backbone` + Detectron2's FPN with a max-pooled P6, exactly as
    ``build_resnet_fpn_backbone`` (``MODEL.FPN.IN_FEATURES``, ``OUT_CHANNELS``, ``NORM``,
    ``FUSE_TYPE``)."""
    return resnet_fpn(cfg, build_narrow_resnet_backbone(cfg, input_shape))


def resnet_fpn(cfg, bottom_up: ResNet) -> FPN:
    """Detectron2's FPN on ``bottom_up`` with a max-pooled P6 (``MODEL.FPN.*``), as
    ``build_resnet_fpn_backbone`` builds it."""
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
