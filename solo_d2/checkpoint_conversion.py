"""Convert published SOLO checkpoints and torchvision ResNet weights to solo_d2 parameter names.

Three source layouts are recognised from their keys:

- ``"mmdet"``: mmdetection 2.x / 3.x ``SOLO`` detectors (``backbone.``, ``neck.``,
  ``mask_head.`` with ``cls_convs``, ``conv_cls``, ``mask_convs[_x|_y]``,
  ``conv_mask_list[_x|_y]``) and ``SOLOv2`` detectors (``mask_head.`` with ``cls_convs``,
  ``conv_cls``, ``kernel_convs``, ``conv_kernel`` and ``mask_feature_head.convs_all_levels.{i}
  .conv{j}`` / ``mask_feature_head.conv_pred``). 2.x and 3.x use the same names.
- ``"official"``: the official SOLO repository (github.com/WXinlong/SOLO, mmdetection 1.x):
  ``bbox_head.`` with ``cate_convs``, ``solo_cate`` / ``dsolo_cate``, ``ins_convs[_x|_y]``,
  ``solo_ins_list`` / ``dsolo_ins_list_x|_y``. Its configs say ``num_classes=81`` (background
  included) but its category conv has ``num_classes - 1`` output channels and no background
  channel, exactly like solo_d2's: channels map one to one. Its SOLOv2 checkpoints have
  ``bbox_head.`` with ``cate_convs``, ``solo_cate``, ``kernel_convs``, ``solo_kernel`` and a
  separate ``mask_feat_head.`` (``convs_all_levels.{i}.conv{j}``, ``conv_pred.0``).
- ``"torchvision"``: a torchvision ResNet ImageNet state dict (``conv1``, ``bn1``, ``layer1..4``,
  ``fc`` dropped): only ``backbone.bottom_up.*`` comes out, for training from scratch.

Head types (from the mask output layers): ``"SOLO"`` (one S^2-channel conv per level),
``"DecoupledSOLO"`` (separate X and Y towers, one coordinate channel each),
``"DecoupledSOLOLight"`` (one tower, X and Y output convs) and ``"SOLOv2"`` (a kernel conv and
a mask feature branch; its weights do not give the grid numbers, which come from the config).
Deformable convs (mmcv / mmdet 1.x ``DeformConvPack`` and ``ModulatedDeformConvPack``:
``conv.weight`` + ``conv.conv_offset.*``) map to :class:`solo_d2.modeling.layers.DeformConv`;
the offset conv's channels tell DCN v1 (2 k^2) from modulated DCN v2 (3 k^2, the published
SOLOv2 DCN models), whose channel order (offsets, then modulation logits) ``DeformConv`` keeps.
Deformable tower convs set ``MODEL.SOLO.NUM_DEFORMABLE_CONVS`` / ``DEFORMABLE_MODULATED``,
deformable SOLOv2 mask feature convs ``MODEL.SOLO.MASK_FEATURE_DEFORMABLE``; deformable backbone
convs (``layer{2..4}.{b}.conv2.conv_offset.*``) select ``build_solo_resnet_fpn_backbone`` with
``MODEL.RESNETS.DEFORM_ON_PER_STAGE`` / ``DEFORM_MODULATED``. (The key names and shapes are
checked; the numerical equality of mmcv's and torchvision's deformable conv cannot be checked
here: mmcv-lite has no compiled ops.)

Checkpoint files are read with ``torch.load(weights_only=True)``; one that holds other Python
objects (mmengine's checkpoints keep a ``message_hub`` of ``HistoryBuffer`` objects in ``meta``)
is only unpickled when the caller allows it (``--unsafe-load``).

solo_d2 names (Detectron2's ResNet/FPN, the heads of :mod:`solo_d2.modeling.heads`,
``docs/head_parameter_names.md``):
``backbone.bottom_up.stem.conv1[.norm]``, ``backbone.bottom_up.res{2..5}.{b}.conv{k}[.norm]``,
``.shortcut[.norm]`` (FrozenBN buffers ``weight, bias, running_mean, running_var``),
``backbone.fpn_lateral{2..5}``, ``backbone.fpn_output{2..5}``, ``head.cate_tower.{i}``
(``[conv, norm, ReLU]`` per conv, or ``[conv, ReLU]`` without norm), ``head.cate_pred``,
``head.mask_tower`` / ``head.mask_tower_x`` / ``head.mask_tower_y``, ``head.mask_preds.{l}`` or
``head.mask_preds.{l}.x`` / ``.y``; SOLOv2: ``head.kernel_tower.{i}``, ``head.kernel_pred``,
``head.mask_feature.levels.{i}.{j}[.norm]``, ``head.mask_feature.pred[.norm]``.

Every source key is either mapped or named in an error; nothing is dropped silently except
BatchNorm's ``num_batches_tracked`` counters, torchvision's ``fc`` classifier and mmengine's
(parameter-free) ``data_preprocessor`` entries.
"""
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

__all__ = [
    "ConversionError",
    "ConvertedCheckpoint",
    "load_source_checkpoint",
    "extract_state_dict",
    "detect_layout",
    "convert_state_dict",
    "converted_config",
    "config_overrides",
    "config_file_for",
    "check_against_model",
    "AUTHOR",
]

#: ``__author__`` written into converted files.
AUTHOR = "solo_d2 convert_weights"

_CONFIG_DIR = os.path.join("configs", "COCO-InstanceSegmentation")
_BLOCKS_TO_DEPTH = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}
_BN = ("weight", "bias", "running_mean", "running_var")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted exactly; the message names the key(s) at fault."""


@dataclass
class ConvertedCheckpoint:
    """A state dict in solo_d2 names and what it holds.

    ``head`` is None for a backbone-only (torchvision) source. ``num_grids`` etc. are None then.
    """

    state_dict: Dict[str, torch.Tensor]
    layout: str
    head: Optional[str]
    depth: int
    stem_channels: int
    res2_channels: int
    bottleneck_channels: Optional[int] = None
    #: res2..res5: whether the stage's 3x3 convs are deformable (``conv2.conv_offset``)
    deform_stages: Tuple[bool, bool, bool, bool] = (False, False, False, False)
    #: the backbone's deformable convs are DCN v2 (27-channel ``conv_offset``)
    deform_modulated: bool = False
    fpn_channels: Optional[int] = None
    num_classes: Optional[int] = None
    num_grids: Optional[List[int]] = None
    conv_channels: Optional[int] = None
    num_stacked_convs: Optional[int] = None
    num_deformable_convs: int = 0
    #: the head's deformable convs (towers, SOLOv2's mask feature branch) are DCN v2
    head_deform_modulated: bool = False
    #: SOLOv2 only: every conv of the mask feature branch is deformable
    mask_feature_deformable: bool = False
    norm: str = "GN"
    #: SOLOv2 only: E, the mask feature branch's channels, its levels, the dynamic kernel size
    mask_feature_dim: Optional[int] = None
    mask_feature_channels: Optional[int] = None
    mask_feature_num_levels: Optional[int] = None
    dynamic_kernel_size: Optional[int] = None


# ---------------------------------------------------------------------------------------------
# Reading the source file
# ---------------------------------------------------------------------------------------------
def load_source_checkpoint(path: str, unsafe_load: bool = False):
    """``torch.load`` a checkpoint: ``weights_only=True`` unless ``unsafe_load``.

    A path that is not a checkpoint file (missing, a folder, empty, truncated, neither a zip nor
    a pickle) raises :class:`solo_d2.checkpoint.CheckpointFileError` saying which. A well-formed
    file that needs arbitrary unpickling (mmengine checkpoints keep Python objects in ``meta``)
    raises :class:`ConversionError` saying that ``--unsafe-load`` is needed, for a file the user
    trusts.
    """
    from .checkpoint import check_checkpoint_file, needs_unsafe_unpickling, unreadable_checkpoint_error

    check_checkpoint_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe_load)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, OSError
        if unsafe_load or not needs_unsafe_unpickling(e):
            raise unreadable_checkpoint_error(path, e) from None
        first = str(e).strip().splitlines()
        detail = next((l.strip() for l in first if "GLOBAL" in l or "global" in l),
                      first[0] if first else "")
        raise ConversionError(
            f"{path} needs arbitrary unpickling to load (it holds Python objects, which can run "
            f"code: {detail[:200]}); if you trust this file, rerun with --unsafe-load") from None


def extract_state_dict(obj) -> Dict[str, torch.Tensor]:
    """The parameter dict of a loaded checkpoint: ``obj["state_dict"]`` (mmcv / mmengine),
    ``obj["model"]`` (Detectron2) or ``obj`` itself (a bare state dict)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(
            "unknown layout: the checkpoint is not a state dict (nor a dict with 'state_dict' "
            f"or 'model'), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"unknown layout: entries that are not tensors: {bad[:5]}")
    # DataParallel / DDP wrappers
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def detect_layout(sd: Dict[str, torch.Tensor]) -> str:
    """"mmdet", "official" or "torchvision" from the keys; :class:`ConversionError` otherwise."""
    if any(k.startswith("mask_head.") for k in sd):
        return "mmdet"
    if any(k.startswith("bbox_head.") for k in sd):
        return "official"
    if "conv1.weight" in sd and "bn1.weight" in sd and any(k.startswith("layer1.") for k in sd):
        return "torchvision"
    if any(k.startswith("backbone.bottom_up.")
           for k in sd) or any(k.startswith("head.") for k in sd):
        raise ConversionError(
            "unknown layout: this looks like a solo_d2 / Detectron2 checkpoint already (keys "
            "'backbone.bottom_up.*' / 'head.*'); load it directly with MODEL.WEIGHTS")
    sample = sorted(sd)[:5]
    raise ConversionError(
        "unknown layout: expected an mmdetection SOLO checkpoint ('mask_head.*'), an official "
        "SOLO checkpoint ('bbox_head.*') or a torchvision ResNet ('conv1', 'bn1', 'layer1.*'); "
        f"first keys: {sample}")


# ---------------------------------------------------------------------------------------------
# Key mapping
# ---------------------------------------------------------------------------------------------
def _backbone_rules(prefix: str):
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
        m = re.fullmatch(rf"convs_all_levels\.(\d+)\.conv(\d+)\.{param}", rest)
        if m:
            return f"head.{name}.levels.{m[1]}.{m[2]}{sub[m[3]]}.{m[4]}"
        m = re.fullmatch(rf"conv_pred\.(?:0\.)?{param}", rest)
        if m:
            return f"head.{name}.pred{sub[m[1]]}.{m[2]}"
        return None
    if kind.startswith("list"):
        m = re.fullmatch(r"(\d+)\.(weight|bias)", rest)
        if not m:
            return None
        suffix = {"list": "", "list_x": ".x", "list_y": ".y"}[kind]
        return f"head.{name}.{m[1]}{suffix}.{m[2]}"
    # tower: ConvModule i with .conv (plain or DeformConvPack) and optionally .gn
    step = 3 if has_norm[module] else 2
    m = re.fullmatch(r"(\d+)\.conv\.(weight|bias|conv_offset\.weight|conv_offset\.bias)", rest)
    if m:
        return f"head.{name}.{step * int(m[1])}.{m[2]}"
    m = re.fullmatch(r"(\d+)\.gn\.(weight|bias)", rest)
    if m:
        return f"head.{name}.{step * int(m[1]) + 1}.{m[2]}"
    return None


def convert_state_dict(sd: Dict[str, torch.Tensor]) -> ConvertedCheckpoint:
    """Rename a source state dict to solo_d2 names and describe it.

    Raises :class:`ConversionError` for an unknown layout, for keys that no rule maps (named),
    and for an incomplete backbone / head (the missing parts named). Tensors are kept as they
    are (float32 copies), except BatchNorm ``num_batches_tracked`` counters, torchvision's
    ``fc.*`` and mmengine's ``data_preprocessor.*`` buffers, which are dropped.
    """
    layout = detect_layout(sd)
    rules = _backbone_rules("" if layout == "torchvision" else "backbone.")
    if layout != "torchvision":
        rules = rules + _NECK_RULES
    head_prefix = {"mmdet": "mask_head.", "official": "bbox_head."}.get(layout)

    # Head keys, in mmdet names
    head_src = {}
    other = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        if layout == "torchvision" and k.startswith("fc."):
            continue
        if k.startswith("data_preprocessor."):
            continue
        if layout == "official" and k.startswith("mask_feat_head."):  # SOLOv2's mask feature
            head_src[("mask_feature_head", k[len("mask_feat_head."):])] = (k, v)
        elif head_prefix and k.startswith(head_prefix):
            module, _, rest = k[len(head_prefix):].partition(".")
            if layout == "official":
                module = _OFFICIAL_HEAD.get(module, "?" + module)
            head_src[(module, rest)] = (k, v)
        else:
            other[k] = v
    has_norm = {
        m: any(mod == m and ".gn." in "." + rest for (mod, rest) in head_src)
        for m in _MMDET_HEAD
    }

    out: Dict[str, torch.Tensor] = {}
    leftover = []

    def put(src_key, new_key, value):
        if new_key in out:
            raise ConversionError(f"two source keys map to {new_key!r} (one is {src_key!r})")
        out[new_key] = value.detach().clone().float() if value.is_floating_point() else value.clone(
        )

    for k, v in other.items():
        for pattern, repl in rules:
            m = re.match(pattern, k)
            if m:
                put(k, repl(m), v)
                break
        else:
            leftover.append(k)
    for (module, rest), (k, v) in head_src.items():
        new = _head_key(module, rest, has_norm)
        if new is None:
            leftover.append(k)
        else:
            put(k, new, v)
    if leftover:
        raise ConversionError(
            f"leftover keys that no rule maps ({len(leftover)}): {_summarize(sorted(leftover))}")
    info = _describe_backbone(out)
    result = ConvertedCheckpoint(state_dict=out, layout=layout, head=None, **info)
    if layout != "torchvision":
        _describe_neck(out, result)
        _describe_head(out, result, {_MMDET_HEAD[m][0]: v for m, v in has_norm.items()})
    return result


# ---------------------------------------------------------------------------------------------
# Describing (and checking the completeness of) what was converted
# ---------------------------------------------------------------------------------------------
def _missing(prefix_keys: List[str], sd) -> None:
    missing = [k for k in prefix_keys if k not in sd]
    if missing:
        raise ConversionError(f"missing keys ({len(missing)}): {_summarize(missing)}")


def _describe_backbone(sd) -> dict:
    bu = "backbone.bottom_up."
    _missing([bu + "stem.conv1.weight"] + [f"{bu}stem.conv1.norm.{b}" for b in _BN], sd)
    blocks = []
    bottleneck = any(re.match(rf"{re.escape(bu)}res\d\.\d+\.conv3\.", k) for k in sd)
    for s in range(2, 6):
        ids = {
            int(m[1])
            for k in sd
            for m in [re.match(rf"{re.escape(bu)}res{s}\.(\d+)\.", k)] if m
        }
        if not ids:
            raise ConversionError(f"missing keys: no backbone stage res{s} ({bu}res{s}.*)")
        if ids != set(range(max(ids) + 1)):
            absent = sorted(set(range(max(ids) + 1)) - ids)
            raise ConversionError(f"missing keys: {bu}res{s} has no block(s) {absent}")
        blocks.append(max(ids) + 1)
    depth = _BLOCKS_TO_DEPTH.get((tuple(blocks), bottleneck))
    if depth is None:
        raise ConversionError(
            f"unknown layout: a ResNet with {blocks} blocks per stage "
            f"({'bottleneck' if bottleneck else 'basic'} blocks) is not ResNet-18/34/50/101/152")
    expected = []
    convs = (1, 2, 3) if bottleneck else (1, 2)
    for s, n in zip(range(2, 6), blocks):
        for b in range(n):
            for c in convs:
                expected += [f"{bu}res{s}.{b}.conv{c}.weight"]
                expected += [f"{bu}res{s}.{b}.conv{c}.norm.{x}" for x in _BN]
    _missing(expected, sd)
    deform = []
    for s, n in zip(range(2, 6), blocks):
        has = [f"{bu}res{s}.{b}.conv2.conv_offset.weight" in sd for b in range(n)]
        if any(has) and not all(has):
            raise ConversionError(
                f"unsupported layout: only blocks {[b for b in range(n) if has[b]]} of res{s} have "
                "deformable convs; solo_d2 makes all or none of a stage's blocks deformable")
        deform.append(all(has))
    offsets = {k: int(v.shape[0]) for k, v in sd.items()
               if k.startswith(bu) and k.endswith("conv2.conv_offset.weight")}
    modulated = _modulated(offsets, 3, "backbone")
    return {
        "deform_stages": tuple(deform),
        "deform_modulated": modulated,
        "depth": depth,
        "stem_channels": int(sd[bu + "stem.conv1.weight"].shape[0]),
        "res2_channels": int(sd[f"{bu}res2.0.conv{convs[-1]}.weight"].shape[0]),
        "bottleneck_channels": int(sd[f"{bu}res2.0.conv1.weight"].shape[0]) if bottleneck else None,
    }


def _modulated(offsets: Dict[str, int], k: int, where: str) -> bool:
    """Whether the offset convs ``offsets`` (key -> output channels) of k x k deformable convs
    are DCN v2 (3 k^2 channels) rather than v1 (2 k^2); all of them the same kind."""
    kinds = {}
    for key, c in offsets.items():
        if c not in (2 * k * k, 3 * k * k):
            raise ConversionError(
                f"shape mismatch: {key} has {c} output channels, neither {2 * k * k} (DCN v1) nor "
                f"{3 * k * k} (modulated DCN v2) for a {k}x{k} deformable conv")
        kinds.setdefault(c == 3 * k * k, key)
    if len(kinds) > 1:
        raise ConversionError(
            f"unsupported layout: the {where} mixes DCN v1 ({kinds[False]}) and DCN v2 "
            f"({kinds[True]}); solo_d2 has one DCN type per {where}")
    return bool(kinds) and next(iter(kinds))


def _describe_neck(sd, info: ConvertedCheckpoint) -> None:
    expected = [
        f"backbone.fpn_{n}{i}.{w}" for n in ("lateral", "output") for i in range(2, 6)
        for w in ("weight", "bias")
    ]
    _missing(expected, sd)
    info.fpn_channels = int(sd["backbone.fpn_output2.weight"].shape[0])


def _tower_size(sd, name: str, has_norm: bool) -> Tuple[int, int, bool]:
    """(number of convs, number of deformable convs, has norm) of ``head.<name>``."""
    keys = [k for k in sd if k.startswith(f"head.{name}.")]
    step = 3 if has_norm else 2
    ids = sorted({int(k.split(".")[2]) for k in keys})
    convs = sorted({i // step for i in ids})
    if not convs:
        return 0, 0, has_norm
    n = max(convs) + 1
    expected = []
    for i in range(n):
        expected.append(f"head.{name}.{step * i}.weight")
        if has_norm:
            expected += [f"head.{name}.{step * i + 1}.weight", f"head.{name}.{step * i + 1}.bias"]
    _missing(expected, sd)
    deform = [i for i in range(n) if f"head.{name}.{step * i}.conv_offset.weight" in sd]
    if deform and deform != list(range(n - len(deform), n)):
        raise ConversionError(
            f"unsupported layout: deformable convs of head.{name} at positions {deform}; "
            "solo_d2 supports deformable convs only at the end of a tower")
    return n, len(deform), has_norm


def _describe_solov2_head(sd, info: ConvertedCheckpoint, has_norm: Dict[str, bool]) -> None:
    towers = ["cate_tower", "kernel_tower"]
    stray = [
        k for k in sd
        if k.startswith("head.") and k.split(".")[1] not in towers + ["cate_pred", "kernel_pred",
                                                                     "mask_feature"]
    ]
    if stray:
        raise ConversionError(f"leftover keys: SOLOv2 checkpoint also has {sorted(stray)[:8]}")
    _missing([f"head.{c}.{w}" for c in ("cate_pred", "kernel_pred") for w in ("weight", "bias")],
             sd)
    sizes = {t: _tower_size(sd, t, has_norm[t]) for t in towers}
    if len({s for s in sizes.values()}) != 1:
        raise ConversionError(f"unsupported layout: towers of different sizes {sizes}")
    n, n_def, tower_norm = sizes["cate_tower"]
    if n == 0:
        raise ConversionError("missing keys: head.cate_tower has no convs")
    mf = "head.mask_feature."
    levels = sorted({int(k.split(".")[3]) for k in sd if k.startswith(mf + "levels.")})
    if not levels or levels != list(range(len(levels))):
        raise ConversionError(f"missing keys: mask feature levels {levels} (expected 0..L-1)")
    mf_norm = has_norm["mask_feature"]
    params = ["weight", "norm.weight", "norm.bias"] if mf_norm else ["weight", "bias"]
    _missing([f"{mf}levels.{i}.{j}.{p}" for i in levels for j in range(max(i, 1)) for p in params]
             + [f"{mf}pred.{p}" for p in params], sd)
    if mf_norm != tower_norm:
        raise ConversionError("unsupported layout: the mask feature branch and the towers differ "
                              "in normalisation (solo_d2's MODEL.SOLO.NORM is one setting)")
    mf_convs = [f"{mf}levels.{i}.{j}" for i in levels for j in range(max(i, 1))] + [mf + "pred"]
    mf_deform = [c for c in mf_convs if c + ".conv_offset.weight" in sd]
    if mf_deform and len(mf_deform) != len(mf_convs):
        raise ConversionError(
            f"unsupported layout: only {len(mf_deform)} of the {len(mf_convs)} mask feature convs "
            f"are deformable (e.g. {mf_deform[0]}); solo_d2 makes all or none of them deformable")
    offsets = {k: int(v.shape[0]) for k, v in sd.items()
               if k.startswith(("head.cate_tower.", "head.kernel_tower.", mf + "levels."))
               and k.endswith("conv_offset.weight")}
    pred_offset = {k: int(v.shape[0]) for k, v in sd.items() if k == mf + "pred.conv_offset.weight"}
    modulated = {m for m in (_modulated(offsets, 3, "head") if offsets else None,
                             _modulated(pred_offset, 1, "head") if pred_offset else None)
                 if m is not None}
    if len(modulated) > 1:
        raise ConversionError("unsupported layout: the head mixes DCN v1 and DCN v2 "
                              "(solo_d2's MODEL.SOLO.DEFORMABLE_MODULATED is one setting)")
    e = int(sd[mf + "pred.weight"].shape[0])
    d = int(sd["head.kernel_pred.weight"].shape[0])
    k = int(round((d / e)**0.5))
    if k * k * e != d:
        raise ConversionError(
            f"shape mismatch: head.kernel_pred.weight has {d} channels, not E * k^2 for the mask "
            f"feature's E = {e}")
    info.head = "SOLOv2"
    info.num_classes = int(sd["head.cate_pred.weight"].shape[0])
    info.num_grids = None  # not in the weights: the config's
    info.conv_channels = int(sd["head.cate_pred.weight"].shape[1])
    info.num_stacked_convs = n
    info.num_deformable_convs = n_def
    info.head_deform_modulated = modulated == {True}
    info.mask_feature_deformable = bool(mf_deform)
    info.norm = "GN" if tower_norm else ""
    info.mask_feature_dim = e
    info.mask_feature_channels = int(sd[mf + "pred.weight"].shape[1])
    info.mask_feature_num_levels = len(levels)
    info.dynamic_kernel_size = k


def _describe_head(sd, info: ConvertedCheckpoint, has_norm: Dict[str, bool]) -> None:
    if "head.kernel_pred.weight" in sd:
        return _describe_solov2_head(sd, info, has_norm)
    if "head.mask_preds.0.weight" in sd:
        head, towers = "SOLO", ["cate_tower", "mask_tower"]
    elif "head.mask_preds.0.x.weight" in sd:
        if any(k.startswith("head.mask_tower_x.") for k in sd):
            head, towers = "DecoupledSOLO", ["cate_tower", "mask_tower_x", "mask_tower_y"]
        else:
            head, towers = "DecoupledSOLOLight", ["cate_tower", "mask_tower"]
    else:
        raise ConversionError(
            "missing keys: no mask output convs (mmdet 'conv_mask_list' / 'conv_mask_list_x|y' / "
            "'conv_kernel', official 'solo_ins_list' / 'dsolo_ins_list_x|y' / 'solo_kernel')")
    stray = [
        k for k in sd
        if k.startswith("head.") and k.split(".")[1] not in towers + ["cate_pred", "mask_preds"]
    ]
    if stray:
        raise ConversionError(f"leftover keys: {head} checkpoint also has {sorted(stray)[:8]}")
    _missing(["head.cate_pred.weight", "head.cate_pred.bias"], sd)
    sizes = {t: _tower_size(sd, t, has_norm[t]) for t in towers}
    if len({s for s in sizes.values()}) != 1:
        raise ConversionError(f"unsupported layout: towers of different sizes {sizes}")
    n, n_def, has_norm = sizes[towers[0]]
    if n == 0:
        raise ConversionError(f"missing keys: head.{towers[0]} has no convs")
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("head.mask_preds.")})
    if levels != list(range(len(levels))):
        raise ConversionError(f"missing keys: mask output convs for levels {levels}")
    grids = []
    for l in levels:
        if head == "SOLO":
            _missing([f"head.mask_preds.{l}.weight", f"head.mask_preds.{l}.bias"], sd)
            s2 = sd[f"head.mask_preds.{l}.weight"].shape[0]
            s = int(round(s2**0.5))
            if s * s != s2:
                raise ConversionError(
                    f"shape mismatch: head.mask_preds.{l}.weight has {s2} channels, not a square S^2"
                )
        else:
            _missing([f"head.mask_preds.{l}.{a}.{w}" for a in "xy" for w in ("weight", "bias")], sd)
            s = int(sd[f"head.mask_preds.{l}.x.weight"].shape[0])
        grids.append(s)
    info.head = head
    info.num_classes = int(sd["head.cate_pred.weight"].shape[0])
    info.num_grids = grids
    info.conv_channels = int(sd["head.cate_pred.weight"].shape[1])
    info.num_stacked_convs = n
    info.num_deformable_convs = n_def
    info.head_deform_modulated = _modulated(
        {k: int(v.shape[0]) for k, v in sd.items()
         if k.startswith("head.") and k.endswith("conv_offset.weight")}, 3, "head")
    info.norm = "GN" if has_norm else ""


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def config_file_for(conv: ConvertedCheckpoint,
                    source_name: str = "",
                    root: str = ".") -> Tuple[str, List[str]]:
    """The ``configs/COCO-InstanceSegmentation/*.yaml`` path for a converted checkpoint, and notes.

    Chosen from the head type, the ResNet depth, light / DCN and (for schedules that exist as
    both 1x and 3x) a "1x" in ``source_name``. SOLOv2 is "light" when its towers have fewer
    than 4 convs (the published light models have 2, the others 4). A depth without a config
    gives the closest one
    with a note saying which keys to change.
    """
    head = conv.head or "SOLO"
    base = {
        "SOLO": "SOLO",
        "DecoupledSOLO": "DecoupledSOLO",
        "DecoupledSOLOLight": "DecoupledSOLO_Light",
        "SOLOv2": "SOLOv2",
    }[head]
    if head == "SOLOv2" and conv.num_stacked_convs is not None and conv.num_stacked_convs < 4:
        base += "_Light"
    deformable = bool(conv.num_deformable_convs or any(conv.deform_stages)
                      or conv.mask_feature_deformable)
    # DCN configs: DecoupledSOLO_Light_DCN_R50_3x.yaml, SOLOv2_R101_DCN_3x.yaml
    prefix, suffix = base, ""
    if deformable and head == "DecoupledSOLOLight":
        prefix = base + "_DCN"
    elif deformable and head == "SOLOv2":
        suffix = "_DCN"
    folder = os.path.join(root, _CONFIG_DIR)
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
    path = os.path.join(_CONFIG_DIR, f"{prefix}_R{depth}{suffix}{'_' + sched if sched else ''}.yaml")
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
    from .config import get_solo_cfg

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


def _summarize(keys: List[str], limit: int = 10) -> str:
    """Keys named in full when few, else grouped with indices as '*' ('head.mask_preds.*.x.weight
    (5)')."""
    if len(keys) <= limit:
        return str(keys)
    groups: Dict[str, int] = {}
    for k in keys:
        g = re.sub(r"\.\d+(?=\.)", ".*", k)
        groups[g] = groups.get(g, 0) + 1
    items = [f"{g} ({n})" if n > 1 else g for g, n in groups.items()]
    return "[" + ", ".join(items[:limit]) + (", ..." if len(items) > limit else "") + "]"


def check_against_model(sd: Dict[str, torch.Tensor], model, backbone_only: bool = False) -> None:
    """Raise :class:`ConversionError` unless ``sd`` has exactly ``model``'s parameters and buffers
    (of ``backbone.bottom_up`` only, when ``backbone_only``), with the same shapes; the message
    names the missing, leftover and mismatched keys."""
    expected = {
        k: v.shape
        for k, v in model.state_dict().items() if not k.startswith(("pixel_mean", "pixel_std"))
    }
    if backbone_only:
        expected = {k: s for k, s in expected.items() if k.startswith("backbone.bottom_up.")}
    missing = sorted(set(expected) - set(sd))
    leftover = sorted(set(sd) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(sd) & set(expected)) if tuple(sd[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_summarize(missing)}")
    if leftover:
        problems.append(f"leftover keys ({len(leftover)}): {_summarize(leftover)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {shapes[:4]}" +
                        (" ..." if len(shapes) > 4 else ""))
    if problems:
        raise ConversionError("; ".join(problems))
