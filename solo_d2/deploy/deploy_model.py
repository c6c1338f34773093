"""``SOLODeployModel``: a SOLO model behind the deploy contract, one image in, final results out.

Contract (what ``tools/deploy/export_model.py`` exports, docs/deploy.md):

- input ``image``: (3, H, W) uint8, channel order ``INPUT.FORMAT``, already resized as the
  config's test transform does (``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``); any H, W.
- outputs, for N detections (N may be 0), best first:

  * ``masks``: (N, H, W) bool, at the input size;
  * ``scores``: (N,) float32;
  * ``classes``: (N,) int64, 0..NUM_CLASSES-1;
  * ``boxes``: (N, 4) float32, XYXY boxes of the masks (Detectron2's ``BitMasks`` convention).

Normalisation and the zero padding to the backbone's size divisibility happen inside, as in
:meth:`solo_d2.modeling.SOLO.preprocess_image`; everything else is the wrapped model's own
modules (backbone, head, postprocessor), so eager and exported results agree.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SOLODeployModel"]


class SOLODeployModel(nn.Module):
    """Wraps a :class:`solo_d2.modeling.SOLO` (not copied: its modules are shared)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if type(model).__name__ != "SOLO":
            raise TypeError(f"SOLODeployModel wraps a SOLO model, got {type(model).__name__}")
        constraints = getattr(model.backbone, "padding_constraints", {}) or {}
        if constraints.get("square_size", 0):
            raise ValueError(
                f"SOLODeployModel: the backbone's padding constraint {constraints} (square "
                "padding) is not supported; only padding to the size divisibility is"
            )
        self.model = model
        self.size_divisibility = max(int(model.backbone.size_divisibility), 1)

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(3, H, W) uint8 -> ``(masks, scores, classes, boxes)`` (module docs)."""
        m = self.model
        h, w = image.shape[-2:]
        x = (image.to(torch.float32) - m.pixel_mean) / m.pixel_std
        d = self.size_divisibility
        padded = ((h + d - 1) // d * d, (w + d - 1) // d * d)
        x = F.pad(x, (0, padded[1] - w, 0, padded[0] - h))[None]
        # The backbone in the standard memory layout (MODEL.SOLO.CHANNELS_LAST is a CPU speed
        # option of eager PyTorch; its layout checks would fix small sizes when exporting).
        features = m.backbone(x)
        # In float32 (a caller's autocast may have run the head in float16 or bfloat16): the
        # post-processor runs with autocast off (float16 overflows on mask areas).
        cate_logits, mask_feats = m.float_outputs(*m.head([features[f] for f in m.in_features]))
        mask_size = m.head.mask_size(mask_feats[0])

        def mask_fn(level, cells):
            img = torch.zeros_like(cells)
            return m.head.mask_probs(mask_feats[level], level, img, cells, out_size=mask_size)

        return m.postprocess.predict(
            [c[0] for c in cate_logits], mask_fn, mask_size, padded, (h, w), (h, w)
        )
