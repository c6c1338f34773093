"""AdelaiDet's SOLOv2 checkpoints (github.com/aim-uofa/AdelaiDet, ``adet/modeling/solov2``), the
Detectron2 implementation with published weights; its checkpointer wraps them in
``{"model": ...}``.

Its backbone is Detectron2's own caffe-style ResNet-FPN, already in solo_d2's names
(``backbone.bottom_up.*``, ``backbone.fpn_lateral{2..5}``, ``backbone.fpn_output{2..5}``; P6 by
max-pooling, no parameters). Its head is two modules:

- ``ins_head``: ``cate_tower`` and ``kernel_tower``, each a Sequential of [conv without bias,
  GroupNorm, ReLU] per conv (conv at 0, 3, 6, 9, GN at 1, 4, 7, 10; [conv, ReLU] without norm;
  the kernel tower's first conv takes the two coordinate channels too), ``cate_pred``,
  ``kernel_pred``: solo_d2's ``head.cate_tower`` / ``head.kernel_tower`` have the same indices;
- ``mask_head``: ``convs_all_levels.{i}.conv{j}`` = Sequential [conv, GN, ReLU] (and
  ``upsample{j}`` without parameters), ``conv_pred`` = [1x1 conv, GN, ReLU]: solo_d2's
  ``head.mask_feature.levels.{i}.{j}[.norm]`` and ``head.mask_feature.pred[.norm]``.

Caffe-style: its config (BGR input, ``STRIDE_IN_1X1 True``, the MSRA means) is one of
``configs/COCO-InstanceSegmentation/AdelaiDet``.
"""
from typing import Dict, List

import torch

from .core import Layout, Renamer, register_layout

_RULES = [
    # Detectron2's ResNet-FPN: the same names
    (r"^(backbone\.bottom_up\..+)$", lambda m: m[1]),
    (r"^(backbone\.fpn_(?:lateral|output)[2-5]\.(?:weight|bias))$", lambda m: m[1]),
    (r"^ins_head\.(cate_tower|kernel_tower)\.(\d+)\.(weight|bias)$",
     lambda m: f"head.{m[1]}.{m[2]}.{m[3]}"),
    (r"^ins_head\.(cate_pred|kernel_pred)\.(weight|bias)$", lambda m: f"head.{m[1]}.{m[2]}"),
    (r"^mask_head\.convs_all_levels\.(\d+)\.conv(\d+)\.0\.(weight|bias)$",
     lambda m: f"head.mask_feature.levels.{m[1]}.{m[2]}.{m[3]}"),
    (r"^mask_head\.convs_all_levels\.(\d+)\.conv(\d+)\.1\.(weight|bias)$",
     lambda m: f"head.mask_feature.levels.{m[1]}.{m[2]}.norm.{m[3]}"),
    (r"^mask_head\.conv_pred\.0\.(weight|bias)$", lambda m: f"head.mask_feature.pred.{m[1]}"),
    (r"^mask_head\.conv_pred\.1\.(weight|bias)$", lambda m: f"head.mask_feature.pred.norm.{m[1]}"),
]


class AdelaiDetLayout(Layout):
    name = "adelaidet"
    description = "an AdelaiDet SOLOv2 checkpoint ('ins_head.*', 'mask_head.convs_all_levels.*')"
    style = "caffe"

    def detect(self, keys: List[str]) -> bool:
        return any(k.startswith("ins_head.") for k in keys)

    def rename(self, sd: Dict[str, torch.Tensor]):
        r = Renamer()
        for k, v in sd.items():
            r.by_rules(k, v, _RULES)
        out = r.result()
        # [conv, GN, ReLU] per conv: a GN at index 1; [conv, ReLU] without norm
        has_norm = {t: f"head.{t}.1.weight" in out for t in ("cate_tower", "kernel_tower")}
        has_norm["mask_feature"] = "head.mask_feature.levels.0.0.norm.weight" in out
        return out, has_norm


register_layout(AdelaiDetLayout())
