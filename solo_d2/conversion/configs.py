"""Config choice for converted checkpoints: which ``configs/COCO-InstanceSegmentation`` file fits
one, the cfg with the checkpoint's sizes, and the ``--opts`` that turn one into the other.
"""
import os
import re
from typing import List, Optional, Tuple

from .core import ConversionError, ConvertedCheckpoint

_CONFIG_DIR = os.path.join("configs", "COCO-InstanceSegmentation")
#: the configs of caffe-style sources (AdelaiDet's SOLOv2, Detectron2's ImageNet pickles)
_CAFFE_CONFIG_DIR = os.path.join(_CONFIG_DIR, "AdelaiDet")

#: What each backbone style needs of a config. The tensor shapes of both styles are the same,
#: so weights of one style load into a model of the other without error and predict garbage.
#: "pytorch": torchvision's ResNets (mmdetection, the official repository): the stride in each
#: bottleneck's 3x3 conv, RGB input normalised with torchvision's ImageNet mean and std.
#: "caffe": Detectron2's MSRA ResNets (its ImageNet pickles, AdelaiDet): the stride in the 1x1
#: conv, BGR input, MSRA means, no std scaling.
INPUT_STYLES = {
    "pytorch": {
        "MODEL.RESNETS.STRIDE_IN_1X1": False,
        "INPUT.FORMAT": "RGB",
        "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
        "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
    },
    "caffe": {
        "MODEL.RESNETS.STRIDE_IN_1X1": True,
        "INPUT.FORMAT": "BGR",
        "MODEL.PIXEL_MEAN": [103.530, 116.280, 123.675],
        "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
    },
}


def config_file_for(conv: ConvertedCheckpoint,
                    source_name: str = "",
                    root: str = ".") -> Tuple[str, List[str]]:
    """The ``configs/COCO-InstanceSegmentation/*.yaml`` path for a converted checkpoint, and notes.

    Caffe-style sources (``conv.style``) get one of ``configs/COCO-InstanceSegmentation/AdelaiDet``.

    Chosen from the head type, the ResNet depth, light / DCN and (for schedules that exist as
    both 1x and 3x) a "1x" in ``source_name``. SOLOv2 is "light" when its towers have fewer
    than 4 convs (the published light models have 2, the others 4). A depth without a config
    gives the closest one
    with a note saying which keys to change.
    """
    head = conv.head or "SOLO"
    if conv.style == "caffe":
        # caffe-style sources: AdelaiDet's SOLOv2 and the ImageNet ResNets it trains from
        if conv.head not in (None, "SOLOv2"):
            raise ConversionError(f"no caffe-style {conv.head} config (configs of that style are "
                                  f"SOLOv2's only, in {_CAFFE_CONFIG_DIR})")
        head = "SOLOv2"
    base = {
        "SOLO": "SOLO",
        "DecoupledSOLO": "DecoupledSOLO",
        "DecoupledSOLOLight": "DecoupledSOLO_Light",
        "SOLOv2": "SOLOv2",
    }[head]
    if (conv.style == "pytorch" and head == "SOLOv2" and conv.num_stacked_convs is not None
            and conv.num_stacked_convs < 4):
        base += "_Light"
    deformable = bool(conv.num_deformable_convs or any(conv.deform_stages)
                      or conv.mask_feature_deformable)
    # DCN configs: DecoupledSOLO_Light_DCN_R50_3x.yaml, SOLOv2_R101_DCN_3x.yaml
    prefix, suffix = base, ""
    if deformable and head == "DecoupledSOLOLight":
        prefix = base + "_DCN"
    elif deformable and head == "SOLOv2":
        suffix = "_DCN"
    config_dir = _CAFFE_CONFIG_DIR if conv.style == "caffe" else _CONFIG_DIR
    folder = os.path.join(root, config_dir)
    available = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    notes = []

    def configs(prefix, suffix):
        # schedule-less names (SOLOv2_Light_R18.yaml) count as 3x
        pattern = re.compile(rf"^{re.escape(prefix)}_R(\d+){re.escape(suffix)}(?:_(\dx))?\.yaml$")
        found = {}
        for f in available:
            m = pattern.match(f)
            if m:
                found.setdefault(int(m[1]), []).append(m[2] or "")
        return found

    found = configs(prefix, suffix)
    if not found and suffix:
        notes.append(f"note: there is no {prefix}_R*{suffix} config; the plain {prefix} one is "
                     "used with the checkpoint's deformable convs")
        suffix = ""
        found = configs(prefix, suffix)
    if not found:
        raise ConversionError(f"no config {prefix}_R*{suffix}_*.yaml in {folder}")
    depth = conv.depth
    if depth not in found:
        closest = min(found, key=lambda d: (abs(d - depth), d))
        notes.append(
            f"note: there is no {prefix}{suffix} config for ResNet-{depth}; the closest is "
            f"R-{closest}")
        depth = closest
    schedules = found[depth]
    sched = "1x" if "1x" in os.path.basename(source_name) and "1x" in schedules else (
        "3x" if "3x" in schedules else schedules[0])
    path = os.path.join(config_dir, f"{prefix}_R{depth}{suffix}{'_' + sched if sched else ''}.yaml")
    return path, notes


#: Keys :func:`converted_config` may change, in the order a note lists them.
_SIZE_KEYS = [
    "MODEL.BACKBONE.NAME",
    "MODEL.RESNETS.DEPTH",
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
    "MODEL.RESNETS.DEFORM_MODULATED",
    "MODEL.RESNETS.STEM_OUT_CHANNELS",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "MODEL.RESNETS.NUM_GROUPS",
    "MODEL.RESNETS.WIDTH_PER_GROUP",
    "MODEL.FPN.OUT_CHANNELS",
    "MODEL.SOLO.NUM_CLASSES",
    "MODEL.SOLO.NUM_GRIDS",
    "MODEL.SOLO.CONV_CHANNELS",
    "MODEL.SOLO.NUM_STACKED_CONVS",
    "MODEL.SOLO.NUM_DEFORMABLE_CONVS",
    "MODEL.SOLO.DEFORMABLE_MODULATED",
    "MODEL.SOLO.MASK_FEATURE_DEFORMABLE",
    "MODEL.SOLO.NORM",
    "MODEL.SOLO.MASK_FEATURE_DIM",
    "MODEL.SOLO.MASK_FEATURE_CHANNELS",
    "MODEL.SOLO.MASK_FEATURE_NUM_LEVELS",
    "MODEL.SOLO.DYNAMIC_KERNEL_SIZE",
]


def config_overrides(cfg, base_cfg) -> List[str]:
    """``KEY VALUE`` pairs (for ``--opts``) where ``cfg`` differs from ``base_cfg`` in the
    architecture sizes that :func:`converted_config` sets."""
    out = []
    for key in _SIZE_KEYS:
        a, b = cfg, base_cfg
        for part in key.split("."):
            a, b = a[part], b[part]
        if a != b:
            value = "[" + ",".join(str(x) for x in a) + "]" if isinstance(
                a, (list, tuple)) else (a if a != "" else '""')
            out += [key, str(value)]
    return out


def converted_config(conv: ConvertedCheckpoint, config_file: Optional[str] = None):
    """A Detectron2 cfg whose model has exactly the converted checkpoint's architecture.

    Starts from ``config_file`` (when given) and sets the sizes read from the checkpoint
    (depth, widths, classes, grids, tower length, deformable convs, norm).
    """
    from ..config import get_solo_cfg

    cfg = get_solo_cfg(config_file)
    r = cfg.MODEL.RESNETS
    r.DEPTH = conv.depth
    r.STEM_OUT_CHANNELS = conv.stem_channels
    r.RES2_OUT_CHANNELS = conv.res2_channels
    r.DEFORM_ON_PER_STAGE = list(conv.deform_stages)
    if any(conv.deform_stages):
        # ResNet-FPN with torchvision-based deformable convs (solo_d2.modeling.deformable_resnet)
        cfg.MODEL.BACKBONE.NAME = "build_solo_resnet_fpn_backbone"
        r.DEFORM_MODULATED = conv.deform_modulated
        r.DEFORM_NUM_GROUPS = 1
    elif conv.depth in (18, 34) and (conv.stem_channels, conv.res2_channels) != (64, 64):
        # Detectron2's builder needs 64-channel stem and res2 for ResNet-18/34
        cfg.MODEL.BACKBONE.NAME = "build_narrow_resnet_fpn_backbone"
    if conv.depth not in (18, 34):
        r.NUM_GROUPS = 1
        r.WIDTH_PER_GROUP = conv.bottleneck_channels
    cfg.MODEL.WEIGHTS = ""
    if conv.fpn_channels is not None:
        cfg.MODEL.FPN.OUT_CHANNELS = conv.fpn_channels
    if conv.head is not None:
        s = cfg.MODEL.SOLO
        s.NUM_CLASSES = conv.num_classes
        if conv.num_grids is not None:  # SOLOv2's weights do not give them: the config's
            if len(conv.num_grids) != len(s.NUM_GRIDS):
                raise ConversionError(f"the checkpoint has {len(conv.num_grids)} levels, the "
                                      f"config {len(s.NUM_GRIDS)} (MODEL.SOLO.NUM_GRIDS)")
            s.NUM_GRIDS = list(conv.num_grids)
        if conv.head == "SOLOv2":
            s.MASK_FEATURE_DIM = conv.mask_feature_dim
            s.MASK_FEATURE_CHANNELS = conv.mask_feature_channels
            s.MASK_FEATURE_NUM_LEVELS = conv.mask_feature_num_levels
            s.DYNAMIC_KERNEL_SIZE = conv.dynamic_kernel_size
            s.MASK_FEATURE_DEFORMABLE = conv.mask_feature_deformable
        s.CONV_CHANNELS = conv.conv_channels
        s.NUM_STACKED_CONVS = conv.num_stacked_convs
        s.NUM_DEFORMABLE_CONVS = conv.num_deformable_convs
        s.DEFORMABLE_MODULATED = conv.head_deform_modulated
        s.NORM = conv.norm
    cfg.DATASETS.TRAIN = ()
    cfg.DATASETS.TEST = ()
    cfg.MODEL.DEVICE = "cpu"
    return cfg



def _cfg_value(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def check_input_style(cfg, conv: ConvertedCheckpoint, config_path: str) -> None:
    """Raise :class:`ConversionError` unless ``cfg`` has the input and ResNet settings of the
    checkpoint's backbone style (:data:`INPUT_STYLES`; ``STRIDE_IN_1X1`` only for bottleneck
    ResNets, where it matters); the message names the source's settings and the config's."""
    want = INPUT_STYLES[conv.style]
    keys = [k for k in want if k != "MODEL.RESNETS.STRIDE_IN_1X1" or conv.depth >= 50]

    def same(a, b):
        if isinstance(b, list):
            return len(a) == len(b) and all(abs(float(x) - y) < 1e-3 for x, y in zip(a, b))
        return a == b

    wrong = [k for k in keys if not same(_cfg_value(cfg, k), want[k])]
    if wrong:
        source = ", ".join(f"{k} {want[k]}" for k in keys)
        config = ", ".join(f"{k} {list(v) if isinstance(v, (list, tuple)) else v}"
                           for k in keys for v in [_cfg_value(cfg, k)])
        raise ConversionError(
            f"the {conv.layout} checkpoint is {conv.style}-style ({source}) but {config_path} "
            f"has {config}: that model would load these weights and predict garbage; use a "
            f"{conv.style}-style config (or leave --config-file out to get one)")
