#!/usr/bin/env python
"""Golden parity fixtures made by mmdetection 3.3.0 itself, and the full-size comparison.

mmdetection is not a dependency of solo_d2: install it into a separate folder once,

    pip install --target /work/mmdet_env --no-deps mmdet==3.3.0 mmengine==0.10.7 mmcv-lite==2.1.0 \\
        addict yapf terminaltables rich shapely scipy markdown-it-py mdurl pygments platformdirs tomli six

and pass that folder with ``--mmdet-path``. mmcv-lite has no compiled ops; mmdet imports
``mmcv.ops`` at import time but the SOLO heads never call them (no DCN here), so this tool
answers every ``mmcv.ops*`` import with an in-process stub module (an import hook installed
before mmdet is imported; nothing is written to disk).

Fixture mode (default) writes ``tests/fixtures/parity/<head>.pth`` for the four heads
(``SOLO``, ``DecoupledSOLO``, ``DecoupledSOLOLight``, ``SOLOv2``): a narrow mmdetection model
(ResNet-18 with ``base_channels`` 8, 32-channel FPN and heads, 2 stacked convs, 3 classes; SOLOv2:
a 32-channel mask feature branch and E = 32) with seeded random weights scaled so that there are
detections, run in eval mode through mmdet's own ``SOLO.predict`` / ``SOLOv2.predict`` on one
padded batch of two RGB images of different sizes that pad to the same
size. Each fixture holds only tensors and plain containers (``torch.load(weights_only=True)``):

- ``state_dict``: the mmdet model's state dict;
- ``images``: list of (3, h, w) uint8 RGB images; ``config``: the test config values used;
- ``cate_probs``: per level (N, C, S, S) sigmoid of mmdet's category logits (before point NMS);
- ``cells``: per level (K,) int64 cell indices k = i*S + j; ``soft_masks``: per level
  (N, K, H0, W0) mmdet's soft masks of those cells at the finest mask size (what mmdet's
  postprocessing thresholds and rescores; for SOLOv2, which forms them inside its
  postprocessing, they are computed here from mmdet's kernels and mask feature the way its
  ``_predict_by_feat_single`` does: ``sigmoid(conv2d(feature, kernel))``);
- ``predictions``: per image ``scores`` (R,), ``labels`` (R,), ``masks`` (R, h, w) packed with
  ``numpy.packbits`` along the flattened mask (``masks_packed``, ``mask_shape``);
- ``backbone`` / ``neck``: the first 2 channels of mmdet's ResNet and FPN outputs.

``--adelaidet-path DIR`` (a checkout of github.com/aim-uofa/AdelaiDet, e.g.
``git clone https://github.com/aim-uofa/AdelaiDet /tmp/AdelaiDet``; never a dependency, nothing of
it is copied into solo_d2) writes ``tests/fixtures/parity/AdelaiDet_SOLOv2.pth`` instead: the
same contents made by AdelaiDet's own SOLOv2 (``adet/modeling/solov2``, on Detectron2, which the
venv has), built from its ``configs/SOLOv2/R50_3x.yaml`` with narrow sizes (caffe-style
ResNet-50 with stem 8 and bottleneck width 4, 32-channel FPN, towers, kernels and mask feature,
3 classes, the small grids and ``NMS_PRE`` 100 of the mmdetection fixtures), on two BGR images.
Its package ``__init__`` files import every AdelaiDet model and their compiled ops; the tool
registers ``adet`` and ``adet.modeling`` as bare packages instead, so that only
``adet.config`` and ``adet.modeling.solov2`` (pure Python on Detectron2) are imported.
The fixture keeps the keys above; ``config`` adds ``source: "adelaidet"`` and the ResNet's
caffe-style settings, ``state_dict`` is AdelaiDet's (its checkpointer's ``model``).

``--full-size`` instead builds mmdetection's published R-50 models (256-channel FPN, the
published head configs, 80 classes), random weights, one 800x1333 image, converts the mmdet
weights with solo_d2's converter into the solo_d2 model of the matching config, runs both and
prints the max abs difference per stage (backbone, FPN, category scores, soft masks of chosen
cells, final predictions). Use ``OMP_NUM_THREADS=1`` on a shared machine.
"""
import argparse
import importlib.abc
import importlib.machinery
import math
import os
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = ("SOLO", "DecoupledSOLO", "DecoupledSOLOLight", "SOLOv2")
MMDET_HEAD_TYPE = {
    "SOLO": "SOLOHead",
    "DecoupledSOLO": "DecoupledSOLOHead",
    "DecoupledSOLOLight": "DecoupledSOLOLightHead",
    "SOLOv2": "SOLOV2Head",
}
MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]


# ---------------------------------------------------------------------------------------------
# mmdetection import with stubbed mmcv.ops
# ---------------------------------------------------------------------------------------------
class _StubOps(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``import mmcv.ops[.x]`` with a module whose every attribute is a placeholder
    ``nn.Module`` subclass (mmcv-lite ships the Python files but not the compiled extension)."""

    def find_spec(self, name, path, target=None):
        if name == "mmcv.ops" or name.startswith("mmcv.ops."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        cache = {}

        def __getattr__(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            if attr not in cache:

                def unavailable(self, *a, **k):
                    raise RuntimeError(
                        f"{spec.name}.{attr} is a stub: mmcv-lite has no compiled ops")

                cache[attr] = type(attr, (torch.nn.Module, ), {
                    "__module__": spec.name,
                    "forward": unavailable
                })
            return cache[attr]

        module.__getattr__ = __getattr__
        return module

    def exec_module(self, module):
        pass


def import_mmdet(mmdet_path: str):
    if not os.path.isdir(os.path.join(mmdet_path, "mmdet")):
        sys.exit(
            f"error: --mmdet-path {mmdet_path} has no mmdet package (see this tool's docstring)")
    sys.path.insert(0, mmdet_path)
    sys.meta_path.insert(0, _StubOps())
    import mmdet
    from mmdet.utils import register_all_modules

    if mmdet.__version__ != "3.3.0":
        sys.exit(
            f"error: mmdet {mmdet.__version__} found in {mmdet_path}; the fixtures are made with 3.3.0"
        )
    register_all_modules()
    return mmdet


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def mmdet_config(head: str, full_size: bool, max_per_img: int) -> dict:
    if full_size:
        backbone = dict(type="ResNet",
                        depth=50,
                        num_stages=4,
                        out_indices=(0, 1, 2, 3),
                        frozen_stages=1,
                        norm_cfg=dict(type="BN", requires_grad=True),
                        norm_eval=True,
                        style="pytorch")
        in_channels, fpn, classes = [256, 512, 1024, 2048], 256, 80
        convs = 4 if head in ("DecoupledSOLOLight", "SOLOv2") else 7
        grids = [40, 36, 24, 16, 12]
        # SOLOv2 R-50 as published: 512-channel towers, mask feature 128 -> E = 256
        feat, mask_feat, e = (512, 128, 256) if head == "SOLOv2" else (fpn, None, None)
    else:
        backbone = dict(type="ResNet",
                        depth=18,
                        base_channels=8,
                        num_stages=4,
                        out_indices=(0, 1, 2, 3),
                        frozen_stages=-1,
                        norm_cfg=dict(type="BN", requires_grad=True),
                        norm_eval=True,
                        style="pytorch")
        in_channels, fpn, classes, convs = [8, 16, 32, 64], 32, 3, 2
        grids = [12, 10, 8, 6, 4]
        feat, mask_feat, e = fpn, 32, 32
    if head == "DecoupledSOLOLight":
        ranges = ((1, 64), (32, 128), (64, 256), (128, 512), (256, 2048))
    else:
        ranges = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
    # The published test_cfg, except that the small fixtures keep fewer candidates before Matrix
    # NMS (100 instead of 500) so that their few hundred candidates exercise where the pre-NMS
    # top-k is taken (after maskness rescoring, in the reference).
    test_cfg = dict(nms_pre=500 if full_size else 100,
                    score_thr=0.1,
                    mask_thr=0.5,
                    filter_thr=0.05,
                    kernel="gaussian",
                    sigma=2.0,
                    max_per_img=max_per_img)
    extra = {}
    if head == "SOLOv2":
        extra["mask_feature_head"] = dict(feat_channels=mask_feat, start_level=0, end_level=3,
                                          out_channels=e, mask_stride=4,
                                          norm_cfg=dict(type="GN", num_groups=32, requires_grad=True))
    return dict(
        type="SOLOv2" if head == "SOLOv2" else "SOLO",
        data_preprocessor=dict(type="DetDataPreprocessor",
                               mean=MEAN,
                               std=STD,
                               bgr_to_rgb=True,
                               pad_size_divisor=32),
        backbone=backbone,
        neck=dict(type="FPN", in_channels=in_channels, out_channels=fpn, start_level=0, num_outs=5),
        mask_head=dict(
            type=MMDET_HEAD_TYPE[head],
            num_classes=classes,
            in_channels=fpn,
            stacked_convs=convs,
            feat_channels=feat,
            strides=[8, 8, 16, 32, 32],
            scale_ranges=ranges,
            pos_scale=0.2,
            num_grids=grids,
            cls_down_index=0,
            loss_mask=dict(type="DiceLoss", use_sigmoid=True, activate=False, loss_weight=3.0),
            loss_cls=dict(type="FocalLoss",
                          use_sigmoid=True,
                          gamma=2.0,
                          alpha=0.25,
                          loss_weight=1.0),
            norm_cfg=dict(type="GN", num_groups=32, requires_grad=True),
            **extra,
        ),
        test_cfg=test_cfg,
    )


def output_convs(model, head: str):
    h = model.mask_head
    if head == "SOLOv2":
        return [h.conv_kernel]
    if head == "SOLO":
        return list(h.conv_mask_list)
    return list(h.conv_mask_list_x) + list(h.conv_mask_list_y)


@torch.no_grad()
def randomize(model, head: str, seed: int, cate_bias: float, cate_std: float, batch_inputs,
              data_samples):
    """Seeded random weights with activations of order 1 (He-scaled convs, GN near identity, BN
    statistics measured on the inputs),
    then the output convs rescaled so that category logits are ``cate_bias + N(0, cate_std)``
    and mask logits have std 2 around a bias that puts a cell's mask near 0.5-0.65: detections
    exist and soft masks are neither all 0 nor all 1."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith("running_mean"):
            t.copy_(0.1 * torch.randn(t.shape, generator=g))
        elif name.endswith("running_var"):
            t.copy_(0.75 + 0.5 * torch.rand(t.shape, generator=g))
        elif t.dim() == 4:
            fan_in = t.shape[1] * t.shape[2] * t.shape[3]
            t.copy_(torch.randn(t.shape, generator=g) * math.sqrt(2.0 / fan_in))
        elif name.endswith("weight"):
            t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
        else:
            t.copy_(0.1 * torch.randn(t.shape, generator=g))
    # Batch-norm statistics of the backbone from the inputs themselves (one cumulative pass), so
    # that activations stay of order 1 through the residual stages instead of growing with depth.
    bns = [
        m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    model.backbone(batch_inputs)
    for m in bns:
        m.eval()
        m.momentum = 0.1
    # Calibrate the output convs on the actual inputs.
    convs = {"cate": [model.mask_head.conv_cls], "mask": output_convs(model, head)}
    seen = {k: [] for k in convs}
    hooks = [
        m.register_forward_hook(lambda m, i, o, key=key: seen[key].append(
            F.conv2d(i[0], m.weight, None, padding=m.padding))) for key, ms in convs.items()
        for m in ms
    ]
    model.eval()
    model.mask_head(model.extract_feat(batch_inputs))  # the head only: no postprocessing yet
    for h in hooks:
        h.remove()
    for key, target_std, bias in (("cate", cate_std, cate_bias), ("mask", 2.0,
                                                                  0.0 if head == "SOLO" else 1.2)):
        if key == "mask" and head == "SOLOv2":
            continue
        std = torch.cat([x.flatten() for x in seen[key]]).std().item()
        for m in convs[key]:
            m.weight.mul_(target_std / std)
            m.bias.fill_(bias)
    if head == "SOLOv2":
        # The mask logits are kernel . feature: scale the kernel conv (bias 0) so that they have
        # std 2 over all cells of the batch.
        kernel_conv = model.mask_head.conv_kernel
        kernel_conv.bias.zero_()
        kernels, _, feature = model.mask_head(model.extract_feat(batch_inputs))
        logits = torch.cat([torch.einsum("nds,ndp->nsp", k.flatten(2), feature.flatten(2)).flatten()
                            for k in kernels])
        kernel_conv.weight.mul_(2.0 / logits.std().item())


def make_images(sizes, seed: int):
    """Smooth random RGB uint8 images (low-resolution noise, bilinearly upsampled x8)."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for h, w in sizes:
        low = torch.rand((1, 3, h // 8 + 2, w // 8 + 2), generator=g)
        img = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
        images.append((img * 255).round().clamp(0, 255).to(torch.uint8))
    return images


def mmdet_batch(model, images):
    """mmdet's own data preprocessing of RGB images (given to it as BGR, as its pipeline loads
    them): normalisation, BGR->RGB, padding to a multiple of 32, in one batch."""
    from mmdet.structures import DetDataSample

    samples = []
    for img in images:
        h, w = img.shape[-2:]
        s = DetDataSample()
        s.set_metainfo(dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0)))
        samples.append(s)
    data = model.data_preprocessor(
        dict(inputs=[img.flip(0) for img in images], data_samples=samples), False)
    return data["inputs"], data["data_samples"]


@torch.no_grad()
def run_mmdet(model, head: str, images, cells_per_level: int, seed: int, with_features: bool):
    """Run mmdet's SOLO.predict and collect every stage's outputs."""
    batch_inputs, samples = mmdet_batch(model, images)
    captured = {"cate": [], "backbone": None, "neck": None, "head": None}
    hooks = [
        model.mask_head.conv_cls.register_forward_hook(
            lambda m, i, o: captured["cate"].append(o.sigmoid())),
        model.backbone.register_forward_hook(lambda m, i, o: captured.__setitem__("backbone", o)),
        model.neck.register_forward_hook(lambda m, i, o: captured.__setitem__("neck", o)),
        model.mask_head.register_forward_hook(lambda m, i, o: captured.__setitem__("head", o)),
    ]
    model.eval()
    results = model.predict(batch_inputs, samples, rescale=True)
    for h in hooks:
        h.remove()
    grids = model.mask_head.num_grids
    g = torch.Generator().manual_seed(seed + 1)
    cells = [torch.randperm(s * s, generator=g)[:cells_per_level].sort().values for s in grids]
    if head == "SOLOv2":
        # (per level (N, D, S, S) kernels, per level category logits, (N, E, H0, W0) feature):
        # mmdet's _predict_by_feat_single forms masks as sigmoid(conv2d(feature, kernel)), k = 1
        kernels, _, feature = captured["head"]
        soft = [torch.stack([
            F.conv2d(feature[b:b + 1], k[b].flatten(1)[:, c].t()[:, :, None, None])[0]
            for b in range(feature.shape[0])
        ]).sigmoid() for k, c in zip(kernels, cells)]
    elif head == "SOLO":
        mask_preds = captured["head"][0]  # per level (N, S^2, H0, W0), sigmoid, finest size
        soft = [m[:, c] for m, c in zip(mask_preds, cells)]
    else:
        xs, ys = captured["head"][0], captured["head"][1]  # per level (N, S, H0, W0)
        soft = [x[:, c % s] * y[:, c // s] for x, y, c, s in zip(xs, ys, cells, grids)]
    preds = []
    for r in results:
        inst = r.pred_instances
        masks = inst.masks.bool().cpu().numpy()
        preds.append({
            "scores":
            inst.scores.float().clone(),
            "labels":
            inst.labels.long().clone(),
            "masks_packed":
            torch.from_numpy(np.packbits(masks.reshape(masks.shape[0], -1), axis=1).copy()),
            "mask_shape":
            list(masks.shape),
        })
    out = {
        "padded_size": list(batch_inputs.shape[-2:]),
        "cate_probs": [c.clone() for c in captured["cate"]],
        "cells": cells,
        "soft_masks": [s.clone() for s in soft],
        "predictions": preds,
    }
    if with_features:
        out["backbone"] = [f[:, :2].clone() for f in captured["backbone"]]
        out["neck"] = [f[:, :2].clone() for f in captured["neck"]]
    out["_full"] = captured  # not saved
    return out


def build_mmdet(head, full_size, max_per_img, seed, images, cate_bias, cate_std):
    from mmdet.registry import MODELS
    from mmengine.config import ConfigDict

    torch.manual_seed(seed)
    model = MODELS.build(ConfigDict(mmdet_config(head, full_size, max_per_img)))
    batch_inputs, samples = mmdet_batch(model, images)
    randomize(model, head, seed, cate_bias, cate_std, batch_inputs, samples)
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# Fixture mode
# ---------------------------------------------------------------------------------------------
def make_fixture(head: str, out_dir: str, seed: int) -> str:
    sizes = [(104, 168), (100, 172)]  # each pads to 128 x 192 alone (size divisor 32), so the batch
    # is what batch-independent inference (one padded canvas per size group) runs as one group
    images = make_images(sizes, seed)
    max_per_img = 20
    model = build_mmdet(head, False, max_per_img, seed, images, cate_bias=-1.0, cate_std=1.5)
    res = run_mmdet(model, head, images, cells_per_level=3, seed=seed, with_features=True)
    res.pop("_full")
    mh = model.mask_head
    fixture = {
        "head": head,
        "mmdet_version": "3.3.0",
        "state_dict": {
            k: v.clone()
            for k, v in model.state_dict().items()
        },
        "images": images,
        "config": {
            "num_classes": mh.num_classes,
            "num_grids": list(mh.num_grids),
            "strides": list(mh.strides),
            "scale_ranges": [list(r) for r in mh.scale_ranges],
            "stacked_convs": mh.stacked_convs,
            "feat_channels": mh.feat_channels,
            **({"mask_feature_channels": mh.mask_feature_head.feat_channels,
                "mask_feature_dim": mh.mask_feature_head.out_channels,
                "mask_feature_num_levels": mh.mask_feature_head.end_level + 1,
                "dynamic_kernel_size": mh.dynamic_conv_size} if head == "SOLOv2" else {}),
            "resnet_depth": 18,
            "resnet_base_channels": 8,
            "fpn_channels": 32,
            "pixel_mean": MEAN,
            "pixel_std": STD,
            "input_format": "RGB",
            "size_divisor": 32,
            "test_cfg": {
                k: v
                for k, v in model.mask_head.test_cfg.items()
            },
        },
        **res,
    }
    for i, p in enumerate(res["predictions"]):
        print(f"{head}: image {i} {tuple(images[i].shape[-2:])}: {len(p['scores'])} detections, "
              f"labels {p['labels'].tolist()[:10]}..., top score {p['scores'][:1].tolist()}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{head}.pth")
    torch.save(fixture, path)
    torch.load(path, weights_only=True)  # the fixture must load safely
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)")
    return path


# ---------------------------------------------------------------------------------------------
# AdelaiDet's SOLOv2
# ---------------------------------------------------------------------------------------------
CAFFE_MEAN = [103.530, 116.280, 123.675]


def import_adelaidet(path: str):
    """AdelaiDet's ``get_cfg`` and ``SOLOv2`` from the checkout at ``path``, without running the
    ``adet`` / ``adet.modeling`` package ``__init__`` files (they import every model of
    AdelaiDet and its compiled ops, which SOLOv2 does not use)."""
    root = os.path.join(path, "adet")
    if not os.path.isfile(os.path.join(root, "modeling", "solov2", "solov2.py")):
        sys.exit(f"error: --adelaidet-path {path} has no adet/modeling/solov2/solov2.py")
    for name, folder in (("adet", root), ("adet.modeling", os.path.join(root, "modeling"))):
        module = types.ModuleType(name)
        module.__path__ = [folder]
        sys.modules[name] = module
    from adet.config import get_cfg  # its defaults: Detectron2's plus MODEL.SOLOV2 & co
    from adet.modeling.solov2.solov2 import SOLOv2

    return get_cfg, SOLOv2


def adelaidet_cfg(get_cfg, path: str, max_per_img: int):
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(path, "configs", "SOLOv2", "R50_3x.yaml"))
    cfg.merge_from_list([
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
        "MODEL.RESNETS.STEM_OUT_CHANNELS", 8, "MODEL.RESNETS.RES2_OUT_CHANNELS", 16,
        "MODEL.RESNETS.WIDTH_PER_GROUP", 4, "MODEL.FPN.OUT_CHANNELS", 32,
        "MODEL.SOLOV2.INSTANCE_IN_CHANNELS", 32, "MODEL.SOLOV2.INSTANCE_CHANNELS", 32,
        "MODEL.SOLOV2.MASK_IN_CHANNELS", 32, "MODEL.SOLOV2.MASK_CHANNELS", 32,
        "MODEL.SOLOV2.NUM_MASKS", 32, "MODEL.SOLOV2.NUM_KERNELS", 32,
        "MODEL.SOLOV2.NUM_CLASSES", 3, "MODEL.SOLOV2.NUM_GRIDS", [12, 10, 8, 6, 4],
        "MODEL.SOLOV2.NMS_PRE", 100, "MODEL.SOLOV2.MAX_PER_IMG", max_per_img,
    ])
    return cfg


@torch.no_grad()
def randomize_adelaidet(model, seed: int, cate_bias: float, cate_std: float, inputs):
    """:func:`randomize` for AdelaiDet's SOLOv2: He-scaled convs, GN near identity, each FrozenBN's
    statistics set from its input on the images (in forward order), then the category conv
    scaled to logits ``cate_bias + N(0, cate_std)`` and the kernel conv to mask logits of std 2."""
    from detectron2.layers import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if t.dim() == 4:
            fan_in = t.shape[1] * t.shape[2] * t.shape[3]
            t.copy_(torch.randn(t.shape, generator=g) * math.sqrt(2.0 / fan_in))
        elif name.endswith("running_var"):
            t.copy_(0.75 + 0.5 * torch.rand(t.shape, generator=g))
        elif name.endswith("weight"):
            t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
        else:
            t.copy_(0.1 * torch.randn(t.shape, generator=g))

    def set_stats(m, args):
        x = args[0]
        m.running_mean.copy_(x.mean((0, 2, 3)))
        m.running_var.copy_(x.var((0, 2, 3)))

    hooks = [m.register_forward_pre_hook(set_stats) for m in model.backbone.modules()
             if isinstance(m, FrozenBatchNorm2d)]
    images = model.preprocess_image(inputs)
    model.backbone(images.tensor)
    for h in hooks:
        h.remove()
    head = model.ins_head
    head.kernel_pred.bias.zero_()
    cate, kernels, feature = adelaidet_head(model, images)
    logits = torch.cat([c.flatten() for c in cate]) - head.cate_pred.bias.mean()
    head.cate_pred.weight.mul_(cate_std / logits.std().item())
    head.cate_pred.bias.fill_(cate_bias)
    mask_logits = torch.cat([torch.einsum("nds,ndp->nsp", k.flatten(2), feature.flatten(2)).flatten()
                             for k in kernels])
    head.kernel_pred.weight.mul_(2.0 / mask_logits.std().item())


def adelaidet_head(model, images):
    """AdelaiDet's forward up to its head outputs, as its ``forward`` runs it: per level category
    logits and kernels, and the unified mask feature."""
    features = model.backbone(images.tensor)
    ins = model.split_feats([features[f] for f in model.instance_in_features])
    cate, kernels = model.ins_head(ins)
    feature = model.mask_head([features[f] for f in model.mask_in_features])
    return cate, kernels, feature


@torch.no_grad()
def make_adelaidet_fixture(path: str, out_dir: str, seed: int) -> str:
    get_cfg, SOLOv2 = import_adelaidet(path)
    max_per_img = 20
    cfg = adelaidet_cfg(get_cfg, path, max_per_img)
    sizes = [(104, 168), (100, 172)]  # as the mmdetection fixtures: one 128 x 192 padded batch
    images = make_images(sizes, seed)  # read as BGR (the model's input format)
    inputs = [{"image": img, "height": img.shape[1], "width": img.shape[2]} for img in images]
    torch.manual_seed(seed)
    model = SOLOv2(cfg).eval()
    randomize_adelaidet(model, seed, cate_bias=-1.0, cate_std=1.5, inputs=inputs)
    captured = {}
    hooks = [
        model.backbone.bottom_up.register_forward_hook(lambda m, i, o: captured.__setitem__("bottom_up", o)),
        model.backbone.register_forward_hook(lambda m, i, o: captured.__setitem__("fpn", o)),
        model.ins_head.register_forward_hook(lambda m, i, o: captured.__setitem__("ins", o)),
        model.mask_head.register_forward_hook(lambda m, i, o: captured.__setitem__("mask", o)),
    ]
    results = model(inputs)
    for h in hooks:
        h.remove()
    cate, kernels = captured["ins"]
    feature = captured["mask"]
    grids = list(cfg.MODEL.SOLOV2.NUM_GRIDS)
    g = torch.Generator().manual_seed(seed + 1)
    cells = [torch.randperm(s * s, generator=g)[:3].sort().values for s in grids]
    # AdelaiDet forms masks as sigmoid(conv2d(mask feature, kernel)) (inference_single_image)
    soft = [torch.stack([
        F.conv2d(feature[b:b + 1], k[b].flatten(1)[:, c].t()[:, :, None, None])[0]
        for b in range(feature.shape[0])
    ]).sigmoid() for k, c in zip(kernels, cells)]
    preds = []
    for r in results:
        inst = r["instances"]
        masks = inst.pred_masks.bool().numpy()
        preds.append({
            "scores": inst.scores.float().clone(),
            "labels": inst.pred_classes.long().clone(),
            "masks_packed": torch.from_numpy(np.packbits(masks.reshape(masks.shape[0], -1), axis=1).copy()),
            "mask_shape": list(masks.shape),
        })
    s = cfg.MODEL.SOLOV2
    r = cfg.MODEL.RESNETS
    fixture = {
        "head": "SOLOv2",
        "source": "adelaidet",
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "images": images,
        "config": {
            "source": "adelaidet",
            "num_classes": s.NUM_CLASSES,
            "num_grids": grids,
            "strides": list(s.FPN_INSTANCE_STRIDES),
            "scale_ranges": [list(x) for x in s.FPN_SCALE_RANGES],
            "stacked_convs": s.NUM_INSTANCE_CONVS,
            "feat_channels": s.INSTANCE_CHANNELS,
            "mask_feature_channels": s.MASK_CHANNELS,
            "mask_feature_dim": s.NUM_MASKS,
            "mask_feature_num_levels": len(s.MASK_IN_FEATURES),
            "dynamic_kernel_size": 1,
            "resnet_depth": r.DEPTH,
            "resnet_stem_channels": r.STEM_OUT_CHANNELS,
            "resnet_res2_channels": r.RES2_OUT_CHANNELS,
            "resnet_width_per_group": r.WIDTH_PER_GROUP,
            "stride_in_1x1": r.STRIDE_IN_1X1,
            "fpn_channels": cfg.MODEL.FPN.OUT_CHANNELS,
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
            "input_format": cfg.INPUT.FORMAT,
            "size_divisor": 32,
            # in mmdetection's names, as the other fixtures
            "test_cfg": {"nms_pre": s.NMS_PRE, "score_thr": s.SCORE_THR, "mask_thr": s.MASK_THR,
                         "filter_thr": s.UPDATE_THR, "kernel": s.NMS_KERNEL,
                         "sigma": float(s.NMS_SIGMA), "max_per_img": s.MAX_PER_IMG},
        },
        "padded_size": list(model.preprocess_image(inputs).tensor.shape[-2:]),
        "cate_probs": [c.sigmoid().clone() for c in cate],
        "cells": cells,
        "soft_masks": soft,
        "predictions": preds,
        "backbone": [captured["bottom_up"][f"res{i}"][:, :2].clone() for i in range(2, 6)],
        "neck": [captured["fpn"][f"p{i}"][:, :2].clone() for i in range(2, 7)],
    }
    for i, p in enumerate(preds):
        print(f"AdelaiDet SOLOv2: image {i} {tuple(images[i].shape[-2:])}: {len(p['scores'])} "
              f"detections, labels {p['labels'].tolist()[:10]}..., top score {p['scores'][:1].tolist()}")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "AdelaiDet_SOLOv2.pth")
    torch.save(fixture, out)
    torch.load(out, weights_only=True)  # the fixture must load safely
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB)")
    return out


# ---------------------------------------------------------------------------------------------
# Full-size comparison
# ---------------------------------------------------------------------------------------------
def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).float(), b.flatten(1).float()
    inter = (a * b).sum(1)
    union = a.sum(1) + b.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


@torch.no_grad()
def full_size(head: str, seed: int, opts=()):
    sys.path.insert(0, ROOT)
    import solo_d2  # noqa: F401
    from detectron2.modeling import build_model

    from solo_d2.conversion import check_against_model, config_file_for, convert_state_dict, converted_config

    images = make_images([(800, 1333)], seed)
    model = build_mmdet(head, True, 100, seed, images, cate_bias=-4.6, cate_std=1.2)
    ref = run_mmdet(model, head, images, cells_per_level=8, seed=seed, with_features=True)
    full = ref.pop("_full")

    conv = convert_state_dict(model.state_dict())
    config_path, _ = config_file_for(conv, root=ROOT)
    cfg = converted_config(conv, os.path.join(ROOT, config_path))
    cfg.merge_from_list(list(opts))
    tc = model.mask_head.test_cfg
    problems = []
    for key, want in (("INPUT.FORMAT", "RGB"), ("MODEL.PIXEL_MEAN", MEAN), ("MODEL.PIXEL_STD", STD),
                      ("MODEL.RESNETS.STRIDE_IN_1X1",
                       False), ("MODEL.SOLO.SCORE_THRESH_TEST",
                                tc.score_thr), ("MODEL.SOLO.MASK_THRESH_TEST",
                                                tc.mask_thr), ("MODEL.SOLO.NMS_PRE", tc.nms_pre),
                      ("MODEL.SOLO.UPDATE_THRESH_TEST", tc.filter_thr), ("MODEL.SOLO.MAX_PER_IMAGE",
                                                                         tc.max_per_img),
                      ("MODEL.SOLO.NMS_SIGMA", tc.sigma), ("MODEL.SOLO.NMS_KERNEL", tc.kernel)):
        got = cfg
        for part in key.split("."):
            got = got[part]
        if (list(got) if isinstance(got, (list, tuple)) else got) != want:
            problems.append(f"{key} = {got} (mmdetection: {want})")
    if problems:
        print(f"WARNING: {config_path} differs from mmdetection's published settings: " +
              "; ".join(problems))
    ours = build_model(cfg).eval()
    check_against_model(conv.state_dict, ours)
    ours.load_state_dict(conv.state_dict, strict=False)

    img = images[0]
    x = ours.preprocess_image([{"image": img}])
    feats = ours.run_backbone(x.tensor)
    bottom = ours.backbone.bottom_up(x.tensor)
    cate_logits, mask_feats = ours.head([feats[f] for f in ours.in_features])
    out = ours.inference_from_outputs(cate_logits, mask_feats, x, [{"image": img}])[0]["instances"]

    def diff(pairs):
        """(max abs difference, max abs reference value) over (reference, ours) pairs."""
        pairs = list(pairs)
        return (max((a - b).abs().max().item()
                    for a, b in pairs), max(a.abs().max().item() for a, _ in pairs))

    rows = [
        ("backbone res2-res5", *diff(zip(full["backbone"], [bottom[f"res{i}"]
                                                            for i in range(2, 6)]))),
        ("FPN p2-p6", *diff(zip(full["neck"], [feats[f"p{i}"] for i in range(2, 7)]))),
        ("category scores (sigmoid)",
         *diff(zip(ref["cate_probs"], [c.sigmoid() for c in cate_logits]))),
    ]
    mask_size = ours.head.mask_size(mask_feats[0])
    pairs = []
    for level, (cells, theirs) in enumerate(zip(ref["cells"], ref["soft_masks"])):
        m = ours.head.mask_probs(mask_feats[level],
                                 level,
                                 torch.zeros_like(cells),
                                 cells,
                                 out_size=mask_size)
        pairs.append((theirs[0], m))
    rows.append((f"soft masks ({len(ref['cells'][0])} cells per level)", *diff(pairs)))

    p = ref["predictions"][0]
    n = p["mask_shape"][0]
    theirs_masks = torch.from_numpy(
        np.unpackbits(p["masks_packed"].numpy(), axis=1,
                      count=int(np.prod(p["mask_shape"][1:])))).view(p["mask_shape"]).bool()
    in_order = len(out) == n and bool((out.pred_classes == p["labels"]).all())
    if in_order:
        score_d = (out.scores - p["scores"]).abs().max().item()
        iou = mask_iou(out.pred_masks, theirs_masks)
        final = f"{n} and {n} detections, same classes in the same order; min mask IoU {iou.min():.4f}"
    else:
        # Match each mmdet detection to an unused solo_d2 one of the same class by mask IoU.
        ious = mask_iou_matrix(theirs_masks, out.pred_masks)
        same = p["labels"][:, None] == out.pred_classes[None, :]
        ious = ious * same
        used, matched = set(), []
        for i in range(n):
            order = ious[i].argsort(descending=True).tolist()
            j = next((j for j in order if j not in used and ious[i, j] >= 0.5), None)
            if j is not None:
                used.add(j)
                matched.append((i, j))
        score_d = max((abs(p["scores"][i] - out.scores[j]).item() for i, j in matched),
                      default=float("nan"))
        iou = torch.tensor([ious[i, j].item() for i, j in matched] or [float("nan")])
        unmatched_ref = [
            round(p["scores"][i].item(), 4) for i in range(n) if i not in {a
                                                                           for a, _ in matched}
        ]
        unmatched_ours = [round(out.scores[j].item(), 4) for j in range(len(out)) if j not in used]
        final = (
            f"{n} (mmdet) and {len(out)} (solo_d2) detections, not in the same order; {len(matched)} matched "
            f"(same class, mask IoU >= 0.5), min IoU of matched {iou.min():.4f}; unmatched scores: "
            f"mmdet {unmatched_ref}, solo_d2 {unmatched_ours}; lowest kept score {p['scores'][-1].item():.4f}"
        )
    rows.append(("final scores (matched detections)", score_d, p["scores"].abs().max().item()))
    # (cell, class) candidates above the score threshold after point NMS: more than nms_pre means
    # the pre-NMS top-k was exercised
    candidates = 0
    for c in ref["cate_probs"]:
        hmax = F.max_pool2d(c, 2, stride=1, padding=1)[..., :-1, :-1]
        candidates += int(((c * (hmax == c)) > tc.score_thr).sum())
    print(f"\n{head} R-50, one {tuple(img.shape[-2:])} image, random weights (seed {seed}), "
          f"{torch.get_num_threads()} torch thread(s), config {config_path}" +
          (f" with {' '.join(opts)}" if opts else ""))
    print("| stage | max abs difference | max abs value (mmdet) |\n|---|---|---|")
    for name, v, scale in rows:
        print(f"| {name} | {v:.2e} | {scale:.3g} |")
    print(f"| final predictions | {final} | |")
    print(
        f"candidates above score_thr {tc.score_thr} after point NMS: {candidates} (nms_pre {tc.nms_pre})"
    )


def mask_iou_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) IoU of boolean masks (N, H, W) and (M, H, W)."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    inter = a @ b.t()
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return inter / union.clamp(min=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mmdet-path", help="folder with mmdet 3.3.0, mmengine, mmcv-lite")
    parser.add_argument("--adelaidet-path",
                        help="an AdelaiDet checkout: write its SOLOv2 fixture instead")
    parser.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "parity"))
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-size",
                        action="store_true",
                        help="R-50 800x1333 comparison (prints a table)")
    parser.add_argument("--opts",
                        nargs="*",
                        default=[],
                        help="--full-size: KEY VALUE pairs for the solo_d2 config")
    args = parser.parse_args()
    if args.adelaidet_path:
        make_adelaidet_fixture(args.adelaidet_path, args.out, args.seed)
        return
    if not args.mmdet_path:
        parser.error("--mmdet-path (or --adelaidet-path) is required")
    import_mmdet(args.mmdet_path)
    for head in args.heads:
        if args.full_size:
            full_size(head, args.seed, args.opts)
        else:
            make_fixture(head, args.out, args.seed)


if __name__ == "__main__":
    main()
