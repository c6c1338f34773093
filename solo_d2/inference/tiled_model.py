"""``TiledModel``: a SOLO model whose inference tiles large images (``TEST.TILE.ENABLED``).

The evaluation path (:meth:`solo_d2.engine.Trainer.test`) wraps the model in it when
``TEST.TILE.ENABLED`` is True, and its test loader then gives the images at their own size (no
resize to the test size): each image goes through :class:`~solo_d2.inference.TiledPredictor`
with the wrapped model as the tile predictor, so that a large-image dataset is evaluated the way
``tools/predict.py --tile`` predicts it. Inference only (``forward`` in training mode raises).
"""
import numpy as np
import torch
from detectron2.data import transforms as T
from torch import nn

from ..predictor import model_input
from .tiled_predictor import TiledPredictor

__all__ = ["TiledModel"]


class _ModelTiles:
    """A tile predictor on a model: each (h, w, C) image (in the model's channel order) resized
    to the test size as ``SOLOPredictor`` does, outputs of size (h, w)."""

    def __init__(self, model, aug, device):
        self.model, self.aug, self.device = model, aug, device

    def predict_batch(self, images):
        with torch.no_grad():
            return self.model([model_input(np.ascontiguousarray(im), self.aug, self.device)
                               for im in images])


class TiledModel(nn.Module):
    """``model`` with tiled inference (module docs)."""

    def __init__(self, cfg, model: nn.Module):
        super().__init__()
        self.model = model
        aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        device = next(model.parameters()).device
        self.tiler = TiledPredictor(cfg, _ModelTiles(model, aug, device))

    def forward(self, batched_inputs):
        """Detectron2's inference call: ``[{"image": (C, H, W) tensor at the image's own size,
        "height", "width"}]`` -> ``[{"instances": Instances of (height, width)}]``."""
        if self.training:
            raise RuntimeError("TiledModel is for inference: call .eval() first")
        outputs = []
        for inputs in batched_inputs:
            image = inputs["image"]
            size = (inputs.get("height", image.shape[1]), inputs.get("width", image.shape[2]))
            if tuple(size) != tuple(image.shape[1:]):
                raise ValueError(
                    f"TiledModel: image {inputs.get('file_name', '')} is {tuple(image.shape[1:])}, "
                    f"its record says {tuple(size)}: tiled inference takes images at their own "
                    "size (a test loader without resize)")
            outputs.append(self.tiler(image.permute(1, 2, 0).cpu().numpy()))
        return outputs
