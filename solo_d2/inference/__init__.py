"""Predictions at scale: tiled inference of large images and COCO results of a folder.

- :class:`TiledPredictor`: wraps any SOLO predictor; large images by overlapping tiles, merged.
- :class:`TiledModel`: a model whose inference tiles (``TEST.TILE.ENABLED`` in evaluation).
- :class:`CroppedMasks`: instance masks as boxes and cropped bitmaps (bounded memory).
- :mod:`.coco_results`: ``Instances`` to COCO results (RLE or polygons) and indexed mask PNGs.
- :func:`evaluate_segm`: COCO mask AP of results against a ground-truth json.

``tools/predict.py`` is the command line; docs/predictions.md the user guide.
"""
from .coco_evaluation import evaluate_segm
from .coco_results import instances_to_coco_results, indexed_mask_image, mask_to_polygons
from .cropped_masks import CroppedMasks
from .tiled_model import TiledModel
from .tiled_predictor import TiledPredictor
from .tiling import merge_seams, tile_windows, whole_image_nms

__all__ = [
    "CroppedMasks",
    "TiledModel",
    "TiledPredictor",
    "evaluate_segm",
    "indexed_mask_image",
    "instances_to_coco_results",
    "mask_to_polygons",
    "merge_seams",
    "tile_windows",
    "whole_image_nms",
]
