"""ResNet-FPN with deformable 3x3 convs in chosen stages, without Detectron2's compiled ops.

The published Decoupled SOLO light DCN model puts a deformable conv (DCN v1, one deformable
group) in the 3x3 conv of every bottleneck of res3-res5 (mmdetection's
``dcn=dict(type='DCN'), stage_with_dcn=(False, True, True, True)``, strided blocks included:
``fallback_on_stride=False``); the published SOLOv2 DCN models put a modulated one (DCN v2,
``dcn=dict(type='DCNv2')``) in the same places. Detectron2 expresses that with ``MODEL.RESNETS.DEFORM_ON_PER_STAGE``,
but its ``DeformConv`` needs the compiled ``detectron2._C``, which the pure-Python detectron2
build lacks. :func:`build_solo_resnet_fpn_backbone` builds Detectron2's ResNet-FPN with the same
keys and puts :class:`~solo_d2.modeling.layers.DeformConv3x3` (torchvision's
``deform_conv2d``) in place of each chosen block's ``conv2``.

Parameter names: ``bottom_up.res{k}.{b}.conv2.weight``, ``.conv2.norm.*`` and
``.conv2.conv_offset.weight`` / ``.bias`` (mmdetection: ``layer{k-1}.{b}.conv2.conv_offset``;
18 output channels for DCN v1, 27 for DCN v2).
"""
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BottleneckBlock, build_resnet_backbone
from fvcore.nn import weight_init

from .backbone import resnet_fpn
from .layers import DeformConv3x3

__all__ = ["build_solo_resnet_fpn_backbone"]


@BACKBONE_REGISTRY.register()
def build_solo_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """Detectron2's ``build_resnet_fpn_backbone`` (P2-P6, P6 = max-pool of P5) where
    ``MODEL.RESNETS.DEFORM_ON_PER_STAGE`` (res2..res5) selects stages whose bottleneck 3x3 convs
    are deformable (on torchvision's op: DCN v1, or DCN v2 with ``MODEL.RESNETS.DEFORM_MODULATED``;
    ``DEFORM_NUM_GROUPS`` > 1 is refused). Without deformable stages it equals
    ``build_resnet_fpn_backbone``."""
    r = cfg.MODEL.RESNETS
    deform = list(r.DEFORM_ON_PER_STAGE)
    if len(deform) != 4:
        raise ValueError(
            f"MODEL.RESNETS.DEFORM_ON_PER_STAGE must have 4 entries (res2..res5), got {deform}"
        )
    if any(deform):
        if r.DEFORM_NUM_GROUPS != 1:
            raise ValueError(
                f"MODEL.RESNETS.DEFORM_NUM_GROUPS = {r.DEFORM_NUM_GROUPS}: only 1 is supported"
            )
        if r.DEPTH < 50:
            raise ValueError(
                "MODEL.RESNETS.DEFORM_ON_PER_STAGE needs bottleneck blocks (DEPTH >= 50), got "
                f"DEPTH {r.DEPTH}"
            )
    plain = cfg.clone()
    plain.defrost()
    plain.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False] * 4
    bottom_up = build_resnet_backbone(plain, input_shape)
    for idx, on in enumerate(deform):
        if not on:
            continue
        stage = getattr(bottom_up, f"res{idx + 2}")
        for block in stage:
            assert isinstance(block, BottleneckBlock), type(block)
            conv = block.conv2
            block.conv2 = DeformConv3x3(
                conv.in_channels,
                conv.out_channels,
                bias=conv.bias is not None,
                stride=conv.stride[0],
                norm=get_norm(r.NORM, conv.out_channels),
                modulated=bool(r.DEFORM_MODULATED),
            )
            if conv.dilation != (1, 1) or conv.groups != 1:
                raise ValueError(
                    "MODEL.RESNETS.DEFORM_ON_PER_STAGE: dilated or grouped 3x3 convs are not "
                    "supported"
                )
            weight_init.c2_msra_fill(block.conv2)  # as Detectron2 initialises the plain conv
    # Detectron2's builder froze the first FREEZE_AT stages; freeze again so that a replaced
    # conv in a frozen stage is frozen too (FrozenBN, no gradient).
    bottom_up.freeze(cfg.MODEL.BACKBONE.FREEZE_AT)
    return resnet_fpn(cfg, bottom_up)
