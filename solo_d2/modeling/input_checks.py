"""The one check of a SOLO model's input: :func:`check_batched_inputs`."""
from typing import Dict, List

import torch

__all__ = ["check_batched_inputs"]


def check_batched_inputs(batched_inputs: List[Dict[str, torch.Tensor]], training: bool) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming ``batched_inputs[i]`` unless every input is
    what :class:`solo_d2.modeling.SOLO` accepts.

    ``batched_inputs`` must be a non-empty list (or tuple) of dicts; ``image`` a (3, H, W) uint8
    or floating tensor with H, W >= 1 (``SOLOPredictor`` converts grayscale / RGBA / 16-bit
    arrays); a floating image must be finite (no NaN/inf; it is taken as 0..255 pixel values);
    ``height`` / ``width``, when given, positive; with ``training``, ``instances`` is required.
    """
    if not isinstance(batched_inputs, (list, tuple)) or len(batched_inputs) == 0:
        got = type(batched_inputs).__name__
        raise TypeError(
            "SOLO expects a non-empty list of dicts (one per image), got "
            + (f"an empty {got}" if isinstance(batched_inputs, (list, tuple)) else got)
        )
    for i, x in enumerate(batched_inputs):
        where = f"batched_inputs[{i}]"
        if not isinstance(x, dict) or "image" not in x:
            keys = f" with keys {sorted(x)}" if isinstance(x, dict) else ""
            raise TypeError(
                f"{where} must be a dict with an 'image' tensor, got {type(x).__name__}{keys}"
            )
        img = x["image"]
        if not isinstance(img, torch.Tensor):
            raise TypeError(
                f"{where}['image'] must be a torch.Tensor (3, H, W), got {type(img).__name__}"
            )
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(
                f"{where}['image'] must be a (3, H, W) tensor, got shape {tuple(img.shape)}"
            )
        if img.shape[1] == 0 or img.shape[2] == 0:
            raise ValueError(f"{where}['image'] is empty: shape {tuple(img.shape)}")
        if img.dtype != torch.uint8 and not img.is_floating_point():
            raise TypeError(
                f"{where}['image'] has dtype {img.dtype}: expected uint8 or a floating dtype "
                "with 0..255 pixel values"
            )
        for key in ("height", "width"):
            if key in x and not int(x[key]) > 0:
                raise ValueError(
                    f"{where}['{key}'] (requested output size) must be positive, got {x[key]}"
                )
        if training and "instances" not in x:
            raise ValueError(f"{where} has no 'instances': training needs the ground truth")
        if img.is_floating_point():
            finite = torch.isfinite(img)
            if not bool(finite.all()):
                raise ValueError(
                    f"{where}['image'] has {int((~finite).sum())} non-finite (NaN or inf) pixel values"
                )
