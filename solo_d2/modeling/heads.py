"""The SOLO head types, one per file; importing this registers all of them in
:data:`SOLO_HEAD_REGISTRY` (selected by ``MODEL.SOLO.HEAD_TYPE``).

- ``SOLOHead`` (:mod:`.solo_head`): vanilla SOLO, S^2 mask channels per level.
- ``DecoupledSOLOHead`` (:mod:`.decoupled_solo_head`): published Decoupled SOLO, separate X / Y
  towers, 3x3 X / Y output convs.
- ``DecoupledSOLOLightHead`` (:mod:`.decoupled_solo_light_head`): published Decoupled SOLO light,
  one shared tower, 3x3 X / Y output convs.
- ``DecoupledSOLOCompactHead`` (:mod:`.decoupled_solo_light_head`): solo_d2's own variant, one
  shared tower, 1x1 X / Y output convs before the upsample.
- ``SOLOv2Head`` (:mod:`.solov2_head`, with :mod:`.mask_feature_head`): SOLOv2, dynamic kernels
  per cell on one unified stride-4 mask feature.
"""
from .decoupled_solo_head import BaseDecoupledSOLOHead, DecoupledSOLOHead
from .decoupled_solo_light_head import DecoupledSOLOCompactHead, DecoupledSOLOLightHead
from .solo_head import SOLO_HEAD_REGISTRY, BaseSOLOHead, SOLOHead, build_solo_head
from .solov2_head import SOLOv2Head

__all__ = [
    "SOLO_HEAD_REGISTRY",
    "build_solo_head",
    "BaseSOLOHead",
    "SOLOHead",
    "BaseDecoupledSOLOHead",
    "DecoupledSOLOHead",
    "DecoupledSOLOLightHead",
    "DecoupledSOLOCompactHead",
    "SOLOv2Head",
]
