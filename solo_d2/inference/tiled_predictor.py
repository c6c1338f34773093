"""``TiledPredictor``: a predictor for images larger than the model's test size, by tiles.

    from solo_d2 import SOLOPredictor
    from solo_d2.inference import TiledPredictor

    predictor = SOLOPredictor(cfg)
    tiled = TiledPredictor(cfg, predictor)          # TEST.TILE.* of cfg (tile 0: the test size)
    tiled = TiledPredictor(predictor, tile_size=256, overlap=64)   # or explicit arguments
    instances = tiled(image)["instances"]           # image: as for the wrapped predictor

An image whose longer side is more than ``min_image_ratio`` tiles is cut into overlapping
tiles (:func:`~solo_d2.inference.tiling.tile_windows`), each predicted by the wrapped predictor
(which resizes it to the test size: a tile of the test size is seen at its own resolution), the
tiles' instances moved into image coordinates, the objects the overlaps saw twice merged and one
Matrix NMS run over the whole image (:mod:`solo_d2.inference.tiling`); at most
``max_per_image`` instances, by decayed score. Smaller images go to the wrapped predictor whole.

With ``whole_image_pass`` the tiled image is also given to the wrapped predictor whole (resized
to the test size): its instances whose box's longer side is more than ``whole_image_min_size``
(default: the tile stride, tile side - overlap) are kept, cropped to their boxes, and each tile's
detections that are parts or copies of such an instance
(:func:`~solo_d2.inference.tiling.parts_of_whole`, ``whole_image_cover``) are dropped before
merging; large objects then come whole from the whole-image pass, small ones
from the tiles. Its masks are full-size while the wrapped predictor returns them (at most
``MODEL.SOLO.MAX_PER_IMAGE`` x H x W bools), then cropped.

Output of a tiled image: ``Instances`` of the image's size with ``pred_masks`` a
:class:`~solo_d2.inference.cropped_masks.CroppedMasks` (boxes and cropped bitmaps: memory grows
with the masks' areas, not with the number of instances times the image size), ``pred_boxes``
(Boxes of the masks), ``scores`` (float32) and ``pred_classes`` (int64), sorted by descending
score. Any predictor works whose call on an (h, w, C) numpy image returns ``{"instances":
Instances}`` of size (h, w) with ``pred_masks``, ``scores`` and ``pred_classes``
(``predict_batch(images)``, when it has one, predicts ``batch_size`` tiles per call).
"""
import numpy as np
import torch
from detectron2.config import configurable
from detectron2.structures import Instances

from ..config import check_tile_config
from .cropped_masks import CroppedMasks
from .tiling import merge_seams, parts_of_whole, tile_windows, whole_image_nms

__all__ = ["TiledPredictor"]


class TiledPredictor:
    """Tiled inference around any SOLO predictor (module docs)."""

    @configurable
    def __init__(self, predictor, *, tile_size: int, overlap: int = 64,
                 min_image_ratio: float = 1.5, merge_iou: float = 0.5, max_per_image: int = 1000,
                 batch_size: int = 1, nms_kernel: str = "gaussian", nms_sigma: float = 2.0,
                 update_thresh: float = 0.05, merge_cover: float = 0.8,
                 merge_across_classes: bool = True,
                 whole_image_pass: bool = True, whole_image_min_size: int = 0,
                 whole_image_cover: float = 0.5):
        """
        Args:
            predictor: the predictor of one tile (module docs), e.g. a ``SOLOPredictor``.
            tile_size: tile side in image pixels.
            overlap: pixels shared by neighbouring tiles, ``0 <= overlap < tile_size``.
            min_image_ratio: images whose longer side is at most this many tile sides are
                predicted whole (0: every image larger than one tile is tiled).
            merge_iou: see ``TEST.TILE.MERGE_IOU`` (:mod:`solo_d2.config`).
            max_per_image: most instances of a tiled image.
            batch_size: tiles per ``predictor.predict_batch`` call.
            nms_kernel, nms_sigma, update_thresh: the model's Matrix NMS settings
                (``MODEL.SOLO.NMS_KERNEL``, ``NMS_SIGMA``, ``UPDATE_THRESH_TEST``), for the
                whole-image Matrix NMS.
        """
        if tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {tile_size}")
        if not 0 <= overlap < tile_size:
            raise ValueError(f"overlap must be in [0, tile_size {tile_size}), got {overlap}")
        self.predictor = predictor
        self.tile_size, self.overlap = int(tile_size), int(overlap)
        self.min_image_ratio = float(min_image_ratio)
        self.merge_iou = float(merge_iou)
        self.max_per_image = int(max_per_image)
        self.batch_size = max(int(batch_size), 1)
        self.nms_kernel, self.nms_sigma = nms_kernel, float(nms_sigma)
        self.update_thresh = float(update_thresh)
        self.merge_cover = float(merge_cover)
        self.merge_across_classes = bool(merge_across_classes)
        self.whole_image_pass = bool(whole_image_pass)
        self.whole_image_min_size = int(whole_image_min_size) or self.tile_size - self.overlap
        self.whole_image_cover = float(whole_image_cover)

    @classmethod
    def from_config(cls, cfg, predictor):
        check_tile_config(cfg)
        t, sc = cfg.TEST.TILE, cfg.MODEL.SOLO
        return {
            "predictor": predictor,
            "tile_size": t.SIZE or cfg.INPUT.MIN_SIZE_TEST,
            "overlap": t.OVERLAP,
            "min_image_ratio": t.MIN_IMAGE_RATIO,
            "merge_iou": t.MERGE_IOU,
            "max_per_image": t.MAX_PER_IMAGE,
            "batch_size": t.BATCH_SIZE,
            "nms_kernel": sc.NMS_KERNEL,
            "nms_sigma": sc.NMS_SIGMA,
            "update_thresh": sc.UPDATE_THRESH_TEST,
            "merge_cover": t.MERGE_COVER,
            "merge_across_classes": t.MERGE_ACROSS_CLASSES,
            "whole_image_pass": t.WHOLE_IMAGE_PASS,
            "whole_image_min_size": t.WHOLE_IMAGE_MIN_SIZE,
            "whole_image_cover": t.WHOLE_IMAGE_COVER,
        }

    def should_tile(self, height: int, width: int) -> bool:
        """Whether an image of this size is tiled (module docs)."""
        longer = max(height, width)
        return longer > self.tile_size and longer > self.min_image_ratio * self.tile_size

    def _predict(self, images):
        batch = getattr(self.predictor, "predict_batch", None)
        if batch is not None:
            return batch(images)
        return [self.predictor(im) for im in images]

    def __call__(self, image) -> dict:
        """``{"instances": Instances}`` of ``image`` (an (H, W, C) numpy array, as the wrapped
        predictor takes it), of size (H, W) (module docs)."""
        height, width = image.shape[:2]
        if not self.should_tile(height, width):
            return self._predict([image])[0]
        windows = tile_windows(height, width, self.tile_size, self.overlap)
        whole = self.large_whole_image_instances(image) if self.whole_image_pass else None
        masks, scores, classes, tiles = [], [], [], []
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start:start + self.batch_size]
            outputs = self._predict([image[y0:y1, x0:x1] for x0, y0, x1, y1 in chunk])
            for t, window, out in zip(range(start, start + len(chunk)), chunk, outputs):
                inst = out["instances"].to("cpu")
                tile_masks = CroppedMasks.from_masks(inst.pred_masks, window[:2], (height, width))
                if whole is not None and len(inst) and len(whole[0]):
                    keep = ~parts_of_whole(torch.as_tensor(inst.pred_masks), tile_masks.boxes,
                                           window, whole[0], self.whole_image_cover)
                    inst, tile_masks = inst[torch.as_tensor(keep)], tile_masks[keep]
                masks.append(tile_masks)
                scores.append(inst.scores.float().numpy())
                classes.append(inst.pred_classes.numpy())
                tiles.append(np.full(len(inst), t, dtype=np.int64))
        return {"instances": self.combine(CroppedMasks.cat(masks), np.concatenate(scores),
                                          np.concatenate(classes), np.concatenate(tiles),
                                          np.asarray(windows), whole)}

    def large_whole_image_instances(self, image):
        """The whole-image pass (module docs): ``(masks, scores, classes)`` of the instances of
        ``image`` predicted whole whose box's longer side is more than ``whole_image_min_size``;
        ``masks`` a :class:`CroppedMasks` of the image, scores (N,) float32, classes (N,) int64."""
        inst = self._predict([image])[0]["instances"].to("cpu")
        masks = CroppedMasks.from_masks(inst.pred_masks)
        sides = np.maximum(masks.boxes[:, 2] - masks.boxes[:, 0], masks.boxes[:, 3] - masks.boxes[:, 1])
        keep = np.flatnonzero(sides > self.whole_image_min_size)
        return (masks[keep], inst.scores.float().numpy()[keep],
                inst.pred_classes.numpy().astype(np.int64)[keep])

    def combine(self, masks, scores, classes, tiles, windows, whole=None) -> Instances:
        """The image's ``Instances`` from all tiles' detections in image coordinates and, if
        given, the kept whole-image instances ``whole`` (:meth:`large_whole_image_instances`):
        seam merging, whole-image Matrix NMS, the update threshold and the ``max_per_image`` cap."""
        masks, scores, classes, seen_by = merge_seams(masks, scores, classes, tiles, windows,
                                                      self.merge_iou, self.merge_cover,
                                                      self.merge_across_classes)
        if whole is not None:  # the whole-image pass: one more "tile", seeing the whole image
            seen_by = np.concatenate([np.pad(seen_by, ((0, 0), (0, 1))),
                                      np.eye(1, len(windows) + 1, len(windows), dtype=bool)
                                      .repeat(len(whole[0]), axis=0)])
            masks = CroppedMasks.cat([masks, whole[0]])
            scores, classes = np.concatenate([scores, whole[1]]), np.concatenate([classes, whole[2]])
        order = np.argsort(-scores, kind="stable")
        masks, scores, classes, seen_by = masks[order], scores[order], classes[order], seen_by[order]
        scores = whole_image_nms(masks, scores, classes, seen_by, self.nms_kernel, self.nms_sigma)
        keep = np.flatnonzero(scores >= self.update_thresh)
        keep = keep[np.argsort(-scores[keep], kind="stable")][: self.max_per_image]
        masks = masks[keep]
        result = Instances(masks.image_size)
        result.pred_masks = masks
        result.pred_boxes = masks.get_bounding_boxes()
        result.scores = torch.as_tensor(scores[keep], dtype=torch.float32)
        result.pred_classes = torch.as_tensor(classes[keep], dtype=torch.int64)
        return result
