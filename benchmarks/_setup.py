"""What the scripts in ``benchmarks/`` share (imported as ``import _setup``: a script's own folder
is on ``sys.path`` when it runs as ``python benchmarks/NAME.py``).

Importing this module puts the repository root and ``tools/`` first on ``sys.path``: the
scripts use the checkout's ``solo_d2`` and the models, stage timer and random-weight set-up of
``tools/benchmark.py`` (re-exported here). :func:`prepared_model` is that set-up in one call:
build -> calibrate the frozen BatchNorm statistics on the image -> force candidates.
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _folder in (REPO / "tools", REPO):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from _common import (  # noqa: E402
    calibrate_frozen_bn,
    config_parser,
    force_candidates,
    is_solo,
    load_cfg,
    run_tool,
)
from benchmark import MODELS, Timer, build, infer_stages  # noqa: E402

__all__ = [
    "REPO", "MODELS", "Timer", "build", "infer_stages", "calibrate_frozen_bn", "force_candidates",
    "is_solo", "load_cfg", "config_parser", "run_tool", "bench_image", "prepared_model",
]


def bench_image(h: int, w: int, device="cpu", seed: int = 0):
    """A (3, h, w) uint8 image of uniform noise, the same for a given ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g).to(device)


def prepared_model(name: str, image, device="cpu", candidates=None, masks="random", force=True):
    """Model ``name`` of ``tools/benchmark.py`` (``MODELS``) with random weights, in eval mode,
    its FrozenBatchNorm statistics calibrated on ``image``, and (``force``) a realistic
    post-processing load: :func:`force_candidates`, with ``candidates`` (SOLO models: that many
    (cell, class) pairs pass the score threshold on ``image``; None leaves the threshold) and
    object-like candidate masks when ``masks == "objects"``."""
    model = build(name, device).eval()
    calibrate_frozen_bn(model, image)
    if force:
        force_candidates(model, image, candidates if is_solo(model) else None,
                         object_masks=masks == "objects")
    return model
