"""``CroppedMasks``: N instance masks of a large image, each kept as its box and the bitmap inside it.

A full-size bool mask of a 2048 x 2048 image takes 4 MB; a tiled prediction of such an image
holds thousands of candidate masks, most of them tens of pixels wide. ``CroppedMasks`` stores
each mask as its tight box (``boxes``, XYXY integers, ``x1`` = last column + 1, Detectron2's
convention) and the bool bitmap inside that box, so memory grows with the masks' areas, not
with N x H x W. Full-size masks are made one at a time, on demand (iteration, :meth:`full`).

It can stand as the ``pred_masks`` field of Detectron2 ``Instances``: it has ``len``, indexing
(an int, a slice, a bool or int64 tensor / array), ``to`` (a CPU structure: returns itself),
``cat`` and iteration (one (H, W) bool numpy array per mask, which is what Detectron2's
``instances_to_coco_json`` encodes). ``np.asarray`` of it makes all N full-size masks at once:
for drawing small images only.
"""
from typing import List, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.structures import Boxes

__all__ = ["CroppedMasks"]


class CroppedMasks:
    """N masks of an (H, W) image as boxes and cropped bitmaps (module docs).

    Attributes:
        boxes: (N, 4) int64 numpy array, XYXY in image pixels, ``x1``/``y1`` exclusive; an empty
            mask has the box (0, 0, 0, 0).
        bitmaps: N bool numpy arrays, bitmap i of shape (y1 - y0, x1 - x0) of box i.
        image_size: (H, W).
    """

    def __init__(self, boxes: np.ndarray, bitmaps: Sequence[np.ndarray], image_size: Tuple[int, int]):
        self.boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        self.bitmaps = list(bitmaps)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        if len(self.bitmaps) != len(self.boxes):
            raise ValueError(f"CroppedMasks: {len(self.boxes)} boxes for {len(self.bitmaps)} bitmaps")

    @classmethod
    def from_masks(cls, masks, offset: Tuple[int, int] = (0, 0), image_size=None) -> "CroppedMasks":
        """Crop (R, h, w) bool masks (tensor or array) to their tight boxes.

        Args:
            masks: (R, h, w) bool, e.g. a tile's ``pred_masks``.
            offset: (x, y) of the masks' pixel (0, 0) in the image (a tile's corner).
            image_size: (H, W) of the image; default (h, w) (offset (0, 0)).
        """
        masks = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
        masks = masks.astype(bool, copy=False)
        r, h, w = masks.shape
        image_size = (h, w) if image_size is None else image_size
        rows, cols = masks.any(axis=2), masks.any(axis=1)  # (R, h), (R, w)
        has = rows.any(axis=1)
        y0, x0 = rows.argmax(axis=1), cols.argmax(axis=1)
        y1 = h - rows[:, ::-1].argmax(axis=1)
        x1 = w - cols[:, ::-1].argmax(axis=1)
        boxes = np.stack([x0, y0, x1, y1], axis=1) * has[:, None]
        bitmaps = [masks[k, b[1]:b[3], b[0]:b[2]].copy() for k, b in enumerate(boxes)]
        boxes = boxes + np.array([offset[0], offset[1], offset[0], offset[1]]) * has[:, None]
        return cls(boxes, bitmaps, image_size)

    @classmethod
    def cat(cls, masks_list: List["CroppedMasks"]) -> "CroppedMasks":
        """The masks of several ``CroppedMasks`` of one image size, in order."""
        if not masks_list:
            raise ValueError("CroppedMasks.cat: an empty list")
        boxes = np.concatenate([m.boxes for m in masks_list])
        return cls(boxes, [b for m in masks_list for b in m.bitmaps], masks_list[0].image_size)

    def __len__(self) -> int:
        return len(self.bitmaps)

    def __repr__(self) -> str:
        return f"CroppedMasks(num_masks={len(self)}, image_size={self.image_size})"

    def __getitem__(self, item) -> "CroppedMasks":
        if isinstance(item, int):
            item = [item]
        if isinstance(item, torch.Tensor):
            item = item.cpu().numpy()
        idx = np.arange(len(self))[item]
        return CroppedMasks(self.boxes[idx], [self.bitmaps[i] for i in idx], self.image_size)

    def to(self, *args, **kwargs) -> "CroppedMasks":
        """Itself (a CPU structure, whatever the device asked)."""
        return self

    @property
    def device(self):
        return torch.device("cpu")

    def areas(self) -> np.ndarray:
        """(N,) int64 pixel counts."""
        return np.array([int(b.sum()) for b in self.bitmaps], dtype=np.int64)

    def get_bounding_boxes(self) -> Boxes:
        """Detectron2 ``Boxes`` (float32 XYXY) of the masks, as ``BitMasks.get_bounding_boxes``."""
        return Boxes(torch.as_tensor(self.boxes, dtype=torch.float32))

    def full(self, i: int) -> np.ndarray:
        """Mask i as an (H, W) bool array."""
        out = np.zeros(self.image_size, dtype=bool)
        x0, y0, x1, y1 = self.boxes[i]
        out[y0:y1, x0:x1] = self.bitmaps[i]
        return out

    def __iter__(self):
        for i in range(len(self)):
            yield self.full(i)

    def __array__(self, dtype=None, copy=None):
        out = np.zeros((len(self), *self.image_size), dtype=bool)
        for i, (x0, y0, x1, y1) in enumerate(self.boxes):
            out[i, y0:y1, x0:x1] = self.bitmaps[i]
        return out if dtype is None else out.astype(dtype)

    def crop(self, window) -> np.ndarray:
        """(N, y1 - y0, x1 - x0) bool: all masks inside ``window`` = (x0, y0, x1, y1)."""
        wx0, wy0, wx1, wy1 = (int(v) for v in window)
        out = np.zeros((len(self), wy1 - wy0, wx1 - wx0), dtype=bool)
        lo = np.maximum(self.boxes[:, :2], [wx0, wy0])  # (N, 2) x, y of the part inside
        hi = np.minimum(self.boxes[:, 2:], [wx1, wy1])
        for k in np.flatnonzero((lo < hi).all(axis=1)):
            (x0, y0), (x1, y1), b = lo[k], hi[k], self.boxes[k]
            out[k, y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0] = self.bitmaps[k][y0 - b[1]:y1 - b[1],
                                                                          x0 - b[0]:x1 - b[0]]
        return out

    def intersection(self, i: int, j: int, window=None) -> int:
        """Pixels in both mask i and mask j (and inside ``window`` = (x0, y0, x1, y1) if given)."""
        a, b = self.boxes[i], self.boxes[j]
        x0, y0 = max(a[0], b[0]), max(a[1], b[1])
        x1, y1 = min(a[2], b[2]), min(a[3], b[3])
        if window is not None:
            x0, y0 = max(x0, window[0]), max(y0, window[1])
            x1, y1 = min(x1, window[2]), min(y1, window[3])
        if x0 >= x1 or y0 >= y1:
            return 0
        ma = self.bitmaps[i][y0 - a[1]:y1 - a[1], x0 - a[0]:x1 - a[0]]
        mb = self.bitmaps[j][y0 - b[1]:y1 - b[1], x0 - b[0]:x1 - b[0]]
        return int(np.count_nonzero(ma & mb))

    def area_in(self, i: int, window) -> int:
        """Pixels of mask i inside ``window`` = (x0, y0, x1, y1)."""
        a = self.boxes[i]
        x0, y0 = max(a[0], window[0]), max(a[1], window[1])
        x1, y1 = min(a[2], window[2]), min(a[3], window[3])
        if x0 >= x1 or y0 >= y1:
            return 0
        return int(np.count_nonzero(self.bitmaps[i][y0 - a[1]:y1 - a[1], x0 - a[0]:x1 - a[0]]))

    def union(self, indices: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """The union of masks ``indices`` as ``(box, bitmap)`` (the tight box of the union)."""
        boxes = self.boxes[list(indices)]
        x0, y0 = boxes[:, 0].min(), boxes[:, 1].min()
        x1, y1 = boxes[:, 2].max(), boxes[:, 3].max()
        out = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        for i, b in zip(indices, boxes):
            out[b[1] - y0:b[3] - y0, b[0] - x0:b[2] - x0] |= self.bitmaps[i]
        return np.array([x0, y0, x1, y1]), out

    def rle(self, i: int) -> dict:
        """Mask i as COCO RLE of the whole image (``counts`` bytes, as ``mask_util.encode``
        gives), computed from the bitmap and the columns it spans, without a full-size mask."""
        h, w = self.image_size
        x0, y0, x1, y1 = (int(v) for v in self.boxes[i])
        if x1 <= x0:
            runs = np.array([h * w])
        else:
            strip = np.zeros((h, x1 - x0), dtype=np.uint8)  # the columns the mask spans
            strip[y0:y1] = self.bitmaps[i]
            flat = strip.ravel(order="F")  # COCO RLE is column-major
            change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
            runs = np.diff(np.concatenate([[0], change, [flat.size]]))
            if flat[0]:
                runs = np.concatenate([[0], runs])  # runs start with a run of zeros
            runs[0] += x0 * h
            if runs.size % 2:  # ends with zeros
                runs[-1] += (w - x1) * h
            elif x1 < w:
                runs = np.concatenate([runs, [(w - x1) * h]])
        return mask_util.frPyObjects({"size": [h, w], "counts": [int(v) for v in runs]}, h, w)
