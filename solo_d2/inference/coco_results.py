"""One image's ``Instances`` as COCO results, and as an indexed mask image.

A COCO result (what ``COCO.loadRes`` and Detectron2's ``visualize_json_results.py`` read) is::

    {"image_id": int, "file_name": str, "category_id": int (the dataset's id), "score": float,
     "segmentation": RLE {"size": [H, W], "counts": str} or polygons [[x0, y0, x1, y1, ...], ...],
     "bbox": [x, y, w, h] of the mask, "area": mask pixels}

``bbox`` and ``area`` come from the mask (``pycocotools.mask.toBbox`` / ``area`` of its RLE).
Results are in descending score order; an empty mask gives no result.

Polygons (``fmt="polygons"``): the *outer* boundaries of the mask's connected parts
(``cv2.findContours`` with ``RETR_CCOMP``, points at pixel centres, +0.5 as in Detectron2);
COCO polygons cannot express holes (a polygon is filled), so **holes are dropped**: a ring is
written as a disc. A part thinner than 3 boundary points is written as the rectangle of its
pixels. Use RLE (the default) where holes matter.

Indexed mask image (:func:`indexed_mask_image`): pixel value = 1 + the instance's index in the
result list of the image (0 = background), uint8, or uint16 beyond 255 instances. Where masks
overlap, the pixel takes the instance with the higher score (the lower index).
"""
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch

from .cropped_masks import CroppedMasks

__all__ = ["instances_to_coco_results", "mask_to_polygons", "indexed_mask_image", "as_cropped_masks"]


def as_cropped_masks(instances) -> CroppedMasks:
    """``instances.pred_masks`` as :class:`CroppedMasks` (cropping a full (R, H, W) tensor,
    ``BitMasks`` or array when needed)."""
    masks = instances.pred_masks
    if isinstance(masks, CroppedMasks):
        return masks
    masks = getattr(masks, "tensor", masks)  # BitMasks
    return CroppedMasks.from_masks(masks, (0, 0), instances.image_size)


def mask_to_polygons(bitmap: np.ndarray, offset=(0, 0)) -> List[List[float]]:
    """COCO polygons (flat ``[x0, y0, x1, y1, ...]`` lists, image coordinates) of the outer
    boundaries of a bool ``bitmap`` whose pixel (0, 0) is at ``offset`` = (x, y) (module docs:
    holes are dropped)."""
    contours, hierarchy = cv2.findContours(np.ascontiguousarray(bitmap, dtype=np.uint8),
                                           cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    polygons = []
    if hierarchy is None:
        return polygons
    for contour, (_, _, _, parent) in zip(contours, hierarchy[0]):
        if parent != -1:  # a hole's boundary
            continue
        pts = contour.reshape(-1, 2).astype(np.float64) + np.asarray(offset, dtype=np.float64)
        if len(pts) >= 3:
            polygons.append((pts + 0.5).ravel().tolist())
        else:  # one or two pixels: their rectangle
            (x0, y0), (x1, y1) = pts.min(0), pts.max(0) + 1
            polygons.append([x0, y0, x1, y0, x1, y1, x0, y1])
    return polygons


def instances_to_coco_results(instances, image_id: int, file_name: Optional[str] = None,
                              category_ids: Optional[Sequence[int]] = None, fmt: str = "rle",
                              min_score: float = 0.0) -> List[Dict]:
    """COCO results of one image's ``Instances`` (module docs).

    Args:
        instances: with ``pred_masks`` ((R, H, W) bool tensor, ``BitMasks`` or
            :class:`CroppedMasks`), ``scores`` and ``pred_classes`` (contiguous ids).
        image_id: the image's COCO id.
        file_name: written in each result when given.
        category_ids: the dataset's category id of each contiguous class id (default: the
            contiguous ids themselves).
        fmt: ``"rle"`` or ``"polygons"``.
        min_score: instances scored below it are left out.
    """
    if fmt not in ("rle", "polygons"):
        raise ValueError(f"format must be 'rle' or 'polygons', got {fmt!r}")
    masks = as_cropped_masks(instances)
    scores = torch.as_tensor(instances.scores).float().cpu().numpy()
    classes = torch.as_tensor(instances.pred_classes).cpu().numpy()
    results = []
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] < min_score:
            continue
        rle = masks.rle(int(i))
        area = int(mask_util.area(rle))
        if area == 0:
            continue
        c = int(classes[i])
        if fmt == "rle":
            segmentation = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
        else:
            segmentation = mask_to_polygons(masks.bitmaps[i], masks.boxes[i][:2])
        category = int(category_ids[c]) if category_ids is not None else c
        result = {"image_id": int(image_id), "category_id": category,
                  "score": round(float(scores[i]), 5), "segmentation": segmentation,
                  "bbox": [round(float(v), 2) for v in mask_util.toBbox(rle)], "area": area}
        if file_name is not None:
            result["file_name"] = file_name
        results.append(result)
    return results


def indexed_mask_image(instances, order: Optional[Sequence[int]] = None) -> np.ndarray:
    """(H, W) uint8 / uint16 image: 1 + index in ``order`` (default: by descending score) of
    the instance covering each pixel, 0 for background; overlaps go to the lower index (the
    higher score)."""
    masks = as_cropped_masks(instances)
    if order is None:
        scores = torch.as_tensor(instances.scores).float().cpu().numpy()
        order = np.argsort(-scores, kind="stable")
    order = list(order)
    dtype = np.uint8 if len(order) <= 255 else np.uint16
    if len(order) > 65535:
        raise ValueError(f"{len(order)} instances: an indexed mask image holds at most 65535")
    out = np.zeros(masks.image_size, dtype=dtype)
    for index in range(len(order) - 1, -1, -1):  # the lowest index painted last: it wins
        k = order[index]
        x0, y0, x1, y1 = masks.boxes[k]
        out[y0:y1, x0:x1][masks.bitmaps[k]] = index + 1
    return out
