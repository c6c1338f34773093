#!/usr/bin/env python
"""Convert a published SOLO checkpoint (mmdetection 2.x/3.x or the official SOLO repository) or an
ImageNet ResNet (a torchvision state dict, or a Detectron2 model-zoo ``.pkl`` such as
``R-50.pkl``) to a solo_d2 checkpoint.

    python tools/convert_weights.py SRC DST [--config-file CFG] [--unsafe-load]

Writes DST (``{"model": state_dict, "__author__": ..., "matching_heuristics": False}``, loadable
with ``torch.load(weights_only=True)`` and ``SafeDetectionCheckpointer``) and prints, as its last
line, the config to use with it, so that scripts can chain it:

    CFG=$(python tools/convert_weights.py solo_r50_3x.pth solo_r50_3x_d2.pth | tail -n1)
    python demo/demo.py --config-file "$CFG" --opts MODEL.WEIGHTS solo_r50_3x_d2.pth ...

The printed path is relative to the working directory when the config is inside it, else
absolute, so the tool runs from any folder. A checkpoint whose model differs from that config
(e.g. 3 classes) gets a ``note:`` line with the ``--opts`` that build its model; they clear the
config's COCO datasets, whose class count would not match.

The converted tensors are checked key for key and shape for shape against the model that config
builds (with ``--config-file``: against that config's model as it is; without: the chosen
config with the checkpoint's sizes, e.g. its number of classes). The config is chosen from the
source's layout, including its backbone style: a caffe-style source (AdelaiDet, Detectron2's
ImageNet ``.pkl`` files) gets a caffe-style config (BGR input, ``STRIDE_IN_1X1 True``), and an
explicit ``--config-file`` of the other style is refused, naming both. Any problem (unknown
layout, leftover / missing keys, shape mismatches, a head type the config does not build), and a
SRC that is not a checkpoint (empty, truncated, text) exit 2 with a one-line error naming it
(``--debug``: with the traceback). DST is never SRC. mmengine checkpoints keep Python objects
next to the weights: such a (well-formed) file is only unpickled with ``--unsafe-load``, for a
file you trust. ``.pkl`` files are read with an unpickler that accepts numpy arrays and plain
containers only.
"""
import argparse
import os
import sys

import _common  # noqa: F401  (the checkout's solo_d2 first on sys.path)
import torch
from solo_d2.conversion import (  # noqa: E402
    AUTHOR, ConversionError, check_against_model, check_input_style, config_file_for,
    config_overrides, convert_state_dict, converted_config, extract_state_dict,
    load_source_checkpoint,
)
from solo_d2.utils.cli import UserError, add_debug_flag, run_main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convert(src: str, dst: str, config_file: str = None, unsafe_load: bool = False) -> str:
    """Convert ``src`` to ``dst``; returns the config path to print (see module docs)."""
    import solo_d2  # noqa: F401  (registers the meta-architecture, heads and backbones)
    from detectron2.modeling import build_model

    from solo_d2.config import get_solo_cfg

    check_paths(src, dst, config_file)
    conv = convert_state_dict(extract_state_dict(load_source_checkpoint(src, unsafe_load)))
    backbone_only = conv.head is None
    if config_file:
        cfg = get_solo_cfg(config_file)
        cfg.MODEL.WEIGHTS = ""
        cfg.MODEL.DEVICE = "cpu"
        cfg.DATASETS.TRAIN = ()
        cfg.DATASETS.TEST = ()
        config_path, notes = config_file, []
        check_input_style(cfg, conv, config_file)
    else:
        config_path, notes = config_file_for(conv, src, root=ROOT)
        config_path = printable_path(os.path.join(ROOT, config_path))
        cfg = converted_config(conv, config_path)
        plain = get_solo_cfg(config_path)
        opts = config_overrides(cfg, plain)
        if "MODEL.SOLO.NUM_CLASSES" in opts:
            # The config's datasets (COCO) have another class count, which the model's build
            # checks: the options clear them (set yours to train or evaluate).
            opts += ["DATASETS.TRAIN", "[]", "DATASETS.TEST", "[]"]
        if opts:
            notes.append(
                f"note: this checkpoint's model differs from {config_path}: use it with --opts " +
                " ".join(opts))
        if "MODEL.SOLO.NUM_CLASSES" in opts:
            notes.append(
                f"note: {conv.num_classes} classes: set DATASETS.TRAIN / DATASETS.TEST to datasets "
                f"with {conv.num_classes} classes (the config's have {plain.MODEL.SOLO.NUM_CLASSES})"
            )
    try:
        model = build_model(cfg)
    except ValueError as e:
        raise _build_error(e, conv, cfg, config_path) from None
    try:
        check_against_model(conv.state_dict, model, backbone_only=backbone_only)
    except ConversionError as e:
        what = f"{conv.layout} {conv.head or 'ResNet'} R-{conv.depth} checkpoint"
        builds = f"{type(model.head).__name__} (MODEL.SOLO.HEAD_TYPE {cfg.MODEL.SOLO.HEAD_TYPE!r})"
        raise ConversionError(
            f"{what} does not fit the model of {config_path}, which builds {builds}: {e}") from None
    out = {"model": conv.state_dict, "__author__": AUTHOR, "matching_heuristics": False}
    grids = (f"grids {conv.num_grids}" if conv.num_grids is not None else
             f"grids {list(cfg.MODEL.SOLO.NUM_GRIDS)} (the config's: SOLOv2 weights do not give them)")
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    torch.save(out, dst)
    print(f"converted {src} ({conv.layout} layout, " +
          (f"{conv.head} head, {conv.num_classes} classes, {grids}, " if conv.head else
           "backbone only, ") +
          f"ResNet-{conv.depth}, {len(conv.state_dict)} tensors) to {dst}")
    if backbone_only:
        print(
            "note: backbone only (ImageNet weights): the FPN and the head start from their initialisation"
        )
    for note in notes:
        print(note)
    return config_path


def printable_path(path: str) -> str:
    """``path`` relative to the working directory when it is inside it, else absolute."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path, os.getcwd())
    return path if rel.startswith(os.pardir) else rel


def check_paths(src: str, dst: str, config_file: str = None) -> None:
    """Refuse, before loading anything, a DST that is a folder or SRC itself, and a missing
    ``--config-file``."""
    if os.path.isdir(dst):
        raise UserError(f"DST {dst}: a folder; give the file to write, e.g. "
                        f"{os.path.join(dst, os.path.splitext(os.path.basename(src))[0] + '_d2.pth')}")
    if os.path.abspath(src) == os.path.abspath(dst) or (
            os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst)):
        raise UserError(f"DST {dst} is SRC {src}: writing it would overwrite the source "
                        "checkpoint; give another DST")
    if config_file and not os.path.isfile(config_file):
        raise UserError(f"--config-file {config_file}: no such file")


def _build_error(e: ValueError, conv, cfg, config_path: str) -> Exception:
    """The error of a model that the checkpoint's sizes cannot build, naming the keys."""
    if "num_groups" not in str(e):
        return e
    # GroupNorm (MODEL.SOLO.NORM "GN") splits the channels into 32 groups.
    norms = [f"{k} {tuple(v.shape)}" for k, v in conv.state_dict.items()
             if k.startswith("head.") and k.endswith(".weight") and v.dim() == 1 and v.shape[0] % 32]
    keys = [f"{k} = {cfg.MODEL.SOLO[k.split('.')[-1]]}"
            for k in ("MODEL.SOLO.CONV_CHANNELS", "MODEL.SOLO.MASK_FEATURE_CHANNELS")
            if cfg.MODEL.SOLO[k.split(".")[-1]] % 32]
    return ConversionError(
        f"the checkpoint's sizes do not build the model of {config_path} with MODEL.SOLO.NORM "
        f"{cfg.MODEL.SOLO.NORM!r}: GroupNorm needs channels divisible by 32 groups, but "
        f"{', '.join(keys) or 'a norm layer'} (checkpoint: {', '.join(norms[:3]) or 'no head norm'}) "
        f"[{str(e).strip()}]")


def main(argv=None) -> int:
    """The command line (module docs); returns the exit status (known errors: 2)."""
    return run_main(_main, sys.argv[1:] if argv is None else list(argv), prog="convert_weights.py",
                    known=(ConversionError, ValueError))


def _main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "src", help="mmdetection / official SOLO checkpoint, torchvision ResNet state dict or "
        "Detectron2 ImageNet .pkl")
    parser.add_argument("dst", help="output .pth for solo_d2 (MODEL.WEIGHTS)")
    parser.add_argument("--config-file",
                        default=None,
                        help="check against this config's model and print it")
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="allow arbitrary unpickling of SRC (mmengine checkpoints); only for files you trust",
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    config_path = convert(args.src, args.dst, args.config_file, args.unsafe_load)
    print(config_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
