"""Detectron2's model-zoo ImageNet ResNets (``detectron2://ImageNetPretrained/MSRA/R-50.pkl``,
``R-101.pkl``): pickles of numpy arrays in Caffe2 names (``conv1_w``, ``res_conv1_bn_s``,
``res2_0_branch2a_w``, ``res2_0_branch1_bn_b`` ... ``fc1000_w``), caffe-style ResNets (the stride
in each bottleneck's 1x1 conv, BGR input with the MSRA means). The file is read with a
restricted unpickler (:func:`.core.load_numpy_pickle`); only ``backbone.bottom_up.*`` comes out,
for training (its config: ``configs/COCO-InstanceSegmentation/AdelaiDet``).

Names go through Detectron2's own Caffe2 name conversion (``convert_basic_c2_names``, what its
checkpointer applies to these files). Their batch norms are folded into an affine scale and bias
(``_bn_s``, ``_bn_b``) without running statistics: the FrozenBN buffers get mean 0 and variance 1,
as Detectron2 fills them in when it loads such a file. The ImageNet classifier (``fc1000``) is
dropped, and so is the stem conv's Caffe2 bias (``conv1_b``, ~1e-9 values in these files; the
stem conv has no bias in Detectron2, which ignores it too) when it is that small.
"""
import re
from typing import Dict, List

import torch

from .core import ConversionError, Layout, Renamer, register_layout

_NAME = re.compile(
    r"^(stem\.conv1|res[2-5]\.\d+\.(?:conv[123]|shortcut))(\.norm)?\.(weight|bias|running_mean|running_var)$")
#: largest stem conv bias dropped as Caffe2 round-off
_STEM_BIAS_TOL = 1e-4


class Detectron2ImageNetLayout(Layout):
    name = "detectron2_imagenet"
    description = "a Detectron2 ImageNet ResNet .pkl ('conv1_w', 'res2_0_branch2a_w', ...)"
    backbone_only = True
    style = "caffe"

    def detect(self, keys: List[str]) -> bool:
        return "conv1_w" in keys and any(k.startswith("res2_0_branch2a_") for k in keys)

    def rename(self, sd: Dict[str, torch.Tensor]):
        from detectron2.checkpoint.c2_model_loading import convert_basic_c2_names

        r = Renamer()
        keys = list(sd)
        for src, new in zip(keys, convert_basic_c2_names(keys)):
            v = sd[src]
            if new.startswith("fc1000."):  # the ImageNet classifier
                continue
            if new == "stem.conv1.bias":
                if float(v.abs().max()) > _STEM_BIAS_TOL:
                    raise ConversionError(
                        f"{src}: a stem conv bias of up to {float(v.abs().max()):.3g}; Detectron2's "
                        "stem conv has no bias (only Caffe2 round-off below "
                        f"{_STEM_BIAS_TOL} is dropped)")
                continue
            m = _NAME.match(new)
            if m and (m[2] or m[3] == "weight"):  # a norm's parameters and stats, a conv's weight
                r.put(src, "backbone.bottom_up." + new, v)
            else:
                r.leftover.append(src)
        out = r.result()
        for k in [k for k in out if k.endswith(".norm.weight")]:
            base = k[:-len("weight")]
            out.setdefault(base + "running_mean", torch.zeros_like(out[k]))
            out.setdefault(base + "running_var", torch.ones_like(out[k]))
        return out, {}


register_layout(Detectron2ImageNetLayout())
