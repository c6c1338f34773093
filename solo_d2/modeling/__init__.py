"""SOLO modeling: importing this registers the ``SOLO`` meta-architecture and the SOLO heads."""
from .heads import SOLO_HEAD_REGISTRY, DecoupledSOLOHead, SOLOHead, build_solo_head
from .meta_arch import SOLO
from .postprocessing import SOLOPostProcessor, matrix_nms, point_nms
from .targets import LevelTargets, SOLOTargetGenerator

__all__ = [
    "SOLO",
    "SOLOHead",
    "DecoupledSOLOHead",
    "SOLO_HEAD_REGISTRY",
    "build_solo_head",
    "SOLOTargetGenerator",
    "LevelTargets",
    "SOLOPostProcessor",
    "matrix_nms",
    "point_nms",
]
