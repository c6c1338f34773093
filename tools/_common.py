"""Rigging shared by the scripts in ``tools/`` (imported as ``import _common``: a script's own
folder is on ``sys.path`` when it runs as ``python tools/NAME.py``).

Importing this module puts the repository root first on ``sys.path``, so the scripts use the
checkout's ``solo_d2``. It also holds the random-weight model set-up (calibrated FrozenBN,
forced candidates) that the speed benchmark, the FLOP count and the experiments in
``benchmarks/`` (through ``benchmarks/_setup.py``) share, so that all measure the same thing.
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

__all__ = ["REPO", "config_parser", "load_cfg", "is_solo", "calibrate_frozen_bn", "force_candidates", "run_tool"]


def run_tool(main) -> int:
    """Exit status of ``main()``, a known error printed in one line (exit 2;
    :func:`solo_d2.utils.cli.run_main`: the shared way of the command-line tools)."""
    from solo_d2.utils.cli import run_main

    return run_main(main, prog=Path(sys.argv[0]).name)


def config_parser(doc: str, threads: int = 2):
    """An ``argparse`` parser for a tool that runs one config: ``--config-file`` (required),
    ``--threads``, ``--debug`` (tracebacks of known errors, :mod:`solo_d2.utils.cli`) and
    trailing ``KEY VALUE`` config overrides (``opts``); ``doc`` is shown as the description."""
    import argparse

    from solo_d2.utils.cli import add_debug_flag

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--threads", type=int, default=threads)
    add_debug_flag(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return p


def load_cfg(config_file=None, opts=(), model_zoo=None, device=None):
    """:func:`solo_d2.get_solo_cfg` of a config file, or of a Detectron2 model-zoo config
    (``model_zoo``, e.g. ``"COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"``), then
    ``opts``; ``device`` (when given) replaces ``MODEL.DEVICE``. Unfrozen."""
    from solo_d2 import get_solo_cfg

    if model_zoo:
        from detectron2 import model_zoo as zoo

        config_file = zoo.get_config_file(model_zoo)
    cfg = get_solo_cfg(config_file, opts)
    if device is not None:
        cfg.MODEL.DEVICE = device
    return cfg


def is_solo(model):
    return type(model).__name__ == "SOLO"


def calibrate_frozen_bn(model, image):
    """Set every FrozenBatchNorm2d's statistics to those of its input on ``image``, layer by
    layer in forward order, so random-weight activations have unit scale as in a trained
    network (with identity statistics they grow to ~1e4 through ResNet-50, which breaks the
    RPN's proposals and is not what a trained model computes)."""
    import torch
    from detectron2.layers import FrozenBatchNorm2d

    def hook(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, FrozenBatchNorm2d)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        images = model.preprocess_image([{"image": image}])
        model.backbone(images.tensor)
    model.train(was_training)
    for h in handles:
        h.remove()


def force_candidates(model, image=None, candidates=None, object_masks=False):
    """Random weights -> a realistic postprocess load. SOLO models: category biases at 0 (every
    cell a candidate) and random mask outputs; with ``candidates`` (and the ``image`` the model
    will see), ``SCORE_THRESH_TEST`` is then set so that exactly that many (cell, class) pairs
    pass point NMS and the threshold on that image (without it, about every cell of every class,
    ~300,000 at 800x1333, would go through mask formation). Mask R-CNN: class scores peaked, so
    that a few classes pass its 0.05 threshold. Returns the SOLO score threshold set (or None).

    ``object_masks`` (SOLO): random weights give every candidate a speckle mask over the whole
    image, which no trained model predicts. With it, the head still computes every mask as
    usual (the same work), but the values are then replaced by an object-like soft mask: a
    square at the cell's position, of the level's typical object size (the geometric mean of its
    ``SCALE_RANGES`` entry), with a soft edge, plus a tenth of the computed mask (two passes over
    the masks, added to the postprocess time). Mask area,
    maskness, Matrix NMS and pasting then see localised masks, as a trained model's."""
    import torch

    if not is_solo(model):
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            bias = model.roi_heads.box_predictor.cls_score.bias
            bias.copy_(torch.randn(bias.shape, generator=g) * 3.0)
        return None
    if not hasattr(model.head, "cate_pred"):
        raise AttributeError(f"{type(model.head).__name__} has no cate_pred: cannot force candidates")
    with torch.no_grad():
        model.head.cate_pred.bias.zero_()
        g = torch.Generator().manual_seed(1)
        for p in model.head.mask_output_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            else:
                p.zero_()
    if object_masks:
        _object_like_masks(model)
    if candidates is None:
        return None
    from solo_d2.modeling.postprocessing import point_nms

    was_training = model.training
    model.eval()
    with torch.no_grad():
        images = model.preprocess_image([{"image": image}])
        with model.inference_autocast():
            feats = model.run_backbone(images.tensor)
            cate, _ = model.head([feats[f] for f in model.in_features])
        probs = torch.cat([point_nms(c[0].float().sigmoid()).flatten() for c in cate])
    model.train(was_training)
    if probs.numel() <= candidates:
        raise ValueError(f"{candidates} candidates asked, the grids have {probs.numel()} (cell, class) pairs")
    thresh = float(probs.topk(candidates + 1).values[-1])
    model.postprocess.score_thresh = thresh
    return thresh


def _object_like_masks(model):
    """Wrap ``model.head.mask_probs`` (see :func:`force_candidates`)."""
    import torch

    head, compute = model.head, model.head.mask_probs
    sizes = [(lo * hi) ** 0.5 for lo, hi in model.targets.scale_ranges]  # input pixels

    def mask_probs(mask_feat, level, img_idx, cell_idx, out_size=None):
        probs = compute(mask_feat, level, img_idx, cell_idx, out_size)
        h, w = probs.shape[-2:]
        s = head.num_grids[level]
        cy = (torch.div(cell_idx, s, rounding_mode="floor").float() + 0.5) / s * h
        cx = (cell_idx % s).float().add(0.5) / s * w
        ys = torch.arange(h, dtype=torch.float32, device=probs.device)
        xs = torch.arange(w, dtype=torch.float32, device=probs.device)
        radius = sizes[level] / 2 / 4  # the masks are at stride 4
        # a soft-edged square (separable: two 1-D profiles), cheap beside the mask computation
        ay = torch.sigmoid((radius - (ys[None, :] - cy[:, None]).abs()) / 1.5)[:, :, None]
        ax = torch.sigmoid((radius - (xs[None, :] - cx[:, None]).abs()) / 1.5)[:, None, :]
        return probs.mul_(0.1).addcmul_(ay, ax, value=0.9)

    head.mask_probs = mask_probs
