"""Checking a converted state dict against the model a config builds."""
from typing import Dict

import torch

from .core import ConversionError, _summarize


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
