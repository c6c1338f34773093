"""The official SOLO repository's checkpoints (github.com/WXinlong/SOLO, mmdetection 1.x).

``bbox_head.`` with ``cate_convs``, ``solo_cate`` / ``dsolo_cate``, ``ins_convs[_x|_y]``,
``solo_ins_list`` / ``dsolo_ins_list_x|_y``. Its configs say ``num_classes=81`` (background
included) but its category conv has ``num_classes - 1`` output channels and no background
channel, exactly like solo_d2's: channels map one to one. Its SOLOv2 checkpoints have
``bbox_head.`` with ``cate_convs``, ``solo_cate``, ``kernel_convs``, ``solo_kernel`` and a
separate ``mask_feat_head.`` (``convs_all_levels.{i}.conv{j}``, ``conv_pred.0``). Backbone and
neck have mmdetection's names; head modules are renamed to mmdetection's (:mod:`.mmdet`).
"""
from typing import Optional, Tuple

from .core import register_layout
from .mmdet import MMDetStyleLayout

# official head module name -> mmdetection's
_OFFICIAL_HEAD = {
    "cate_convs": "cls_convs",
    "ins_convs": "mask_convs",
    "ins_convs_x": "mask_convs_x",
    "ins_convs_y": "mask_convs_y",
    "solo_cate": "conv_cls",
    "dsolo_cate": "conv_cls",
    "solo_ins_list": "conv_mask_list",
    "dsolo_ins_list_x": "conv_mask_list_x",
    "dsolo_ins_list_y": "conv_mask_list_y",
    "kernel_convs": "kernel_convs",
    "solo_kernel": "conv_kernel",
}


class OfficialLayout(MMDetStyleLayout):
    name = "official"
    description = "an official SOLO checkpoint ('bbox_head.*')"
    head_prefix = "bbox_head."
    head_modules = _OFFICIAL_HEAD

    def head_module(self, key: str) -> Optional[Tuple[str, str]]:
        if key.startswith("mask_feat_head."):  # SOLOv2's mask feature, a module of its own
            return "mask_feature_head", key[len("mask_feat_head."):]
        return super().head_module(key)


register_layout(OfficialLayout())
