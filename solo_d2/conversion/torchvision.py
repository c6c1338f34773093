"""torchvision ResNet ImageNet state dicts (``conv1``, ``bn1``, ``layer1..4``; ``fc`` dropped):
only ``backbone.bottom_up.*`` comes out, for training from scratch. The ResNet rules here are
also those of mmdetection's and the official repository's backbones (torchvision names under
``backbone.``).
"""
import re
from typing import Dict, List

import torch

from .core import Layout, Renamer, Rules, register_layout


def resnet_rules(prefix: str) -> Rules:
    """(regex, replacement) pairs for a torchvision-style ResNet under ``prefix``."""
    p = re.escape(prefix)
    bn = "(weight|bias|running_mean|running_var)"

    def stage(m):
        return str(int(m) + 1)

    return [
        (rf"^{p}conv1\.weight$", lambda m: "backbone.bottom_up.stem.conv1.weight"),
        (rf"^{p}bn1\.{bn}$", lambda m: f"backbone.bottom_up.stem.conv1.norm.{m[1]}"),
        (
            rf"^{p}layer(\d)\.(\d+)\.conv(\d)\.weight$",
            lambda m: f"backbone.bottom_up.res{stage(m[1])}.{m[2]}.conv{m[3]}.weight",
        ),
        (
            rf"^{p}layer(\d)\.(\d+)\.bn(\d)\.{bn}$",
            lambda m: f"backbone.bottom_up.res{stage(m[1])}.{m[2]}.conv{m[3]}.norm.{m[4]}",
        ),
        (
            rf"^{p}layer(\d)\.(\d+)\.conv2\.conv_offset\.(weight|bias)$",
            lambda m: f"backbone.bottom_up.res{stage(m[1])}.{m[2]}.conv2.conv_offset.{m[3]}",
        ),
        (
            rf"^{p}layer(\d)\.(\d+)\.downsample\.0\.weight$",
            lambda m: f"backbone.bottom_up.res{stage(m[1])}.{m[2]}.shortcut.weight",
        ),
        (
            rf"^{p}layer(\d)\.(\d+)\.downsample\.1\.{bn}$",
            lambda m: f"backbone.bottom_up.res{stage(m[1])}.{m[2]}.shortcut.norm.{m[3]}",
        ),
    ]



class TorchvisionLayout(Layout):
    name = "torchvision"
    description = "a torchvision ResNet ('conv1', 'bn1', 'layer1.*')"
    backbone_only = True

    def detect(self, keys: List[str]) -> bool:
        return "conv1.weight" in keys and "bn1.weight" in keys and any(
            k.startswith("layer1.") for k in keys)

    def rename(self, sd: Dict[str, torch.Tensor]):
        r = Renamer()
        rules = resnet_rules("")
        for k, v in sd.items():
            if not k.startswith("fc."):  # the ImageNet classifier
                r.by_rules(k, v, rules)
        return r.result(), {}


register_layout(TorchvisionLayout())
