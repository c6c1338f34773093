"""mmdetection 2.x / 3.x SOLO checkpoints (2.x and 3.x use the same names).

``SOLO`` detectors: ``backbone.`` (a torchvision-style ResNet), ``neck.`` (FPN) and ``mask_head.``
with ``cls_convs``, ``conv_cls``, ``mask_convs[_x|_y]``, ``conv_mask_list[_x|_y]``; ``SOLOv2``
detectors: ``mask_head.`` with ``cls_convs``, ``conv_cls``, ``kernel_convs``, ``conv_kernel`` and
``mask_feature_head.convs_all_levels.{i}.conv{j}`` / ``mask_feature_head.conv_pred``.
The official repository's names (:mod:`.official`) are mapped onto these.
"""
import re
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .core import Layout, Renamer, register_layout
from .torchvision import resnet_rules

_NECK_RULES = [
    (
        r"^neck\.lateral_convs\.([0-3])\.conv\.(weight|bias)$",
        lambda m: f"backbone.fpn_lateral{int(m[1]) + 2}.{m[2]}",
    ),
    (
        r"^neck\.fpn_convs\.([0-3])\.conv\.(weight|bias)$",
        lambda m: f"backbone.fpn_output{int(m[1]) + 2}.{m[2]}",
    ),
]

# Head module names: source name -> (solo_d2 name, kind)
_MMDET_HEAD = {
    "cls_convs": ("cate_tower", "tower"),
    "mask_convs": ("mask_tower", "tower"),
    "mask_convs_x": ("mask_tower_x", "tower"),
    "mask_convs_y": ("mask_tower_y", "tower"),
    "conv_cls": ("cate_pred", "conv"),
    "conv_mask_list": ("mask_preds", "list"),
    "conv_mask_list_x": ("mask_preds", "list_x"),
    "conv_mask_list_y": ("mask_preds", "list_y"),
    "kernel_convs": ("kernel_tower", "tower"),
    "conv_kernel": ("kernel_pred", "conv"),
    "mask_feature_head": ("mask_feature", "mask_feature"),
}


def _first_match(rest: str, rules) -> Optional[str]:
    """The name the first ``(pattern, name_of_match)`` rule whose pattern matches all of
    ``rest`` gives it, or None when none does."""
    for pattern, name_of in rules:
        m = re.fullmatch(pattern, rest)
        if m:
            return name_of(m)
    return None


def _head_key(module: str, rest: str, has_norm: Dict[str, bool]) -> Optional[str]:
    """solo_d2 name of ``<module>.<rest>`` of an mmdet-named head, or None if not mappable."""
    if module not in _MMDET_HEAD:
        return None
    name, kind = _MMDET_HEAD[module]
    if kind == "conv":
        m = re.fullmatch(r"(weight|bias)", rest)
        return f"head.{name}.{m[1]}" if m else None
    if kind == "mask_feature":
        # ConvModules: conv j of level i, and the 1x1 conv_pred (official: conv_pred.0)
        # (a deformable conv's offset conv: conv.conv_offset)
        param = r"(conv|gn|conv\.conv_offset)\.(weight|bias)"
        sub = {"conv": "", "gn": ".norm", "conv.conv_offset": ".conv_offset"}
        return _first_match(rest, [
            (rf"convs_all_levels\.(\d+)\.conv(\d+)\.{param}",
             lambda m: f"head.{name}.levels.{m[1]}.{m[2]}{sub[m[3]]}.{m[4]}"),
            (rf"conv_pred\.(?:0\.)?{param}", lambda m: f"head.{name}.pred{sub[m[1]]}.{m[2]}"),
        ])
    if kind.startswith("list"):
        m = re.fullmatch(r"(\d+)\.(weight|bias)", rest)
        if not m:
            return None
        suffix = {"list": "", "list_x": ".x", "list_y": ".y"}[kind]
        return f"head.{name}.{m[1]}{suffix}.{m[2]}"
    # tower: ConvModule i with .conv (plain or DeformConvPack) and optionally .gn
    step = 3 if has_norm[module] else 2
    return _first_match(rest, [
        (r"(\d+)\.conv\.(weight|bias|conv_offset\.weight|conv_offset\.bias)",
         lambda m: f"head.{name}.{step * int(m[1])}.{m[2]}"),
        (r"(\d+)\.gn\.(weight|bias)", lambda m: f"head.{name}.{step * int(m[1]) + 1}.{m[2]}"),
    ])



def rename_mmdet_style(sd: Dict[str, torch.Tensor],
                       head_module: Callable[[str], Optional[Tuple[str, str]]]):
    """:meth:`Layout.rename` for a checkpoint with a ResNet under ``backbone.``, an mmdetection
    FPN under ``neck.`` and a head whose keys ``head_module`` splits into (mmdetection module
    name, rest of the key) (None for a key outside the head)."""
    head_src = {}
    other = {}
    for k, v in sd.items():
        split = head_module(k)
        if split is None:
            other[k] = v
        else:
            head_src[split] = (k, v)
    has_norm = {
        m: any(mod == m and ".gn." in "." + rest for (mod, rest) in head_src)
        for m in _MMDET_HEAD
    }
    r = Renamer()
    rules = resnet_rules("backbone.") + _NECK_RULES
    for k, v in other.items():
        r.by_rules(k, v, rules)
    for (module, rest), (k, v) in head_src.items():
        new = _head_key(module, rest, has_norm)
        if new is None:
            r.leftover.append(k)
        else:
            r.put(k, new, v)
    return r.result(), {_MMDET_HEAD[m][0]: v for m, v in has_norm.items()}


class MMDetStyleLayout(Layout):
    """A layout of :func:`rename_mmdet_style`: its head's keys start with ``head_prefix``,
    followed by a module name, mmdetection's own or one that ``head_modules`` maps to it."""

    head_prefix = ""
    #: source head module name -> mmdetection's; None: the source names are mmdetection's. A
    #: name it does not map matches no mmdetection module (its keys are left over).
    head_modules: Optional[Dict[str, str]] = None

    def detect(self, keys: List[str]) -> bool:
        return any(k.startswith(self.head_prefix) for k in keys)

    def head_module(self, key: str) -> Optional[Tuple[str, str]]:
        """(mmdetection head module name, rest of the key) of a head key; None for another key."""
        if not key.startswith(self.head_prefix):
            return None
        module, _, rest = key[len(self.head_prefix):].partition(".")
        if self.head_modules is not None:
            module = self.head_modules.get(module, "?" + module)
        return module, rest

    def rename(self, sd: Dict[str, torch.Tensor]):
        return rename_mmdet_style(sd, self.head_module)


class MMDetLayout(MMDetStyleLayout):
    name = "mmdet"
    description = "an mmdetection SOLO checkpoint ('mask_head.*')"
    head_prefix = "mask_head."


register_layout(MMDetLayout())
