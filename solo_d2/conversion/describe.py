"""Describing (and checking the completeness of) a state dict in solo_d2 names: the ResNet's
depth, widths and deformable stages, the FPN's width, the head type and its sizes.
"""
import re
from typing import Dict, Tuple

from .core import ConversionError, ConvertedCheckpoint, _missing

_BLOCKS_TO_DEPTH = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}
_BN = ("weight", "bias", "running_mean", "running_var")


def describe_backbone(sd) -> dict:
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


def describe_neck(sd, info: ConvertedCheckpoint) -> None:
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


def describe_solov2_head(sd, info: ConvertedCheckpoint, has_norm: Dict[str, bool]) -> None:
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


def describe_head(sd, info: ConvertedCheckpoint, has_norm: Dict[str, bool]) -> None:
    if "head.kernel_pred.weight" in sd:
        return describe_solov2_head(sd, info, has_norm)
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

