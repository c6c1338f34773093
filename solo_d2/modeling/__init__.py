"""SOLO modeling: importing this registers the ``SOLO`` meta-architecture, the SOLO heads and the
narrow ResNet-FPN backbone."""
from .backbone import build_narrow_resnet_backbone, build_narrow_resnet_fpn_backbone
from .input_checks import check_batched_inputs
from .deformable_resnet import build_solo_resnet_fpn_backbone
from .heads import (
    SOLO_HEAD_REGISTRY,
    BaseSOLOHead,
    DecoupledSOLOCompactHead,
    DecoupledSOLOHead,
    DecoupledSOLOLightHead,
    SOLOHead,
    SOLOv2Head,
    build_solo_head,
)
from .meta_arch import SOLO
from .postprocessing import SOLOPostProcessor, matrix_nms, point_nms
from .targets import LevelTargets, SOLOTargetGenerator

__all__ = [
    "SOLO",
    "check_batched_inputs",
    "SOLOHead",
    "BaseSOLOHead",
    "DecoupledSOLOHead",
    "DecoupledSOLOLightHead",
    "DecoupledSOLOCompactHead",
    "SOLOv2Head",
    "SOLO_HEAD_REGISTRY",
    "build_solo_head",
    "SOLOTargetGenerator",
    "LevelTargets",
    "SOLOPostProcessor",
    "matrix_nms",
    "point_nms",
    "build_narrow_resnet_backbone",
    "build_narrow_resnet_fpn_backbone",
    "build_solo_resnet_fpn_backbone",
]
