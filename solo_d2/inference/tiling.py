"""How the predictions of overlapping tiles become one image's predictions.

An image larger than the model's test size is cut into overlapping square tiles
(:func:`tile_windows`); each tile is predicted on its own. Then, in full-image coordinates:

0. **Whole-image pass** (optional): the image resized to the test size is predicted once as
   well; its instances larger than a tile can see whole are kept, and a tile's detection that is
   a part or a copy of one of them is dropped (:func:`parts_of_whole`): mostly inside it or
   containing it (:func:`cover_fraction`: intersection / smaller area, any class) and either cut
   by a tile edge (a part) or at least half its area (a copy). A small object seen whole by a
   tile stays, even on top of a large one (whose coarse whole-image mask may cover it).
1. **Seam merging** (:func:`merge_seams`): two detections of the same class (of any classes with
   ``across_classes``: two tiles may name one object differently) from two different tiles are
   the same object when their masks' IoU *inside the region both tiles see* (the
   intersection of the two tile windows) is at least ``merge_iou``, or when one of them is cut
   by a tile edge and, inside that region, at least ``merge_cover`` of the smaller of the two
   masks there lies in the other (a fragment contained in the other tile's mask, whose IoU is
   low because the other mask also covers what lies beyond the fragment's tile). Inside that
   region the two tiles see the same pixels, so an object that a tile edge cuts has, in both
   tiles, the same mask there. Pairs are merged best first (by the lower of their two scores) into groups that
   hold at most one detection of each tile (an object over the corner of four tiles is one group
   of four; the model's own lower-scored variants of an object do not chain onto its best
   detection). A group becomes one instance with the score and class of its best-scored part
   and, as mask, the best-scored *complete* part (one that touches no tile edge inside the
   image: the object seen whole), or, when every part is cut by a tile edge, the *union* of the
   parts (they complete each other).
2. **One Matrix NMS over the whole image** (:func:`whole_image_nms`): Matrix NMS
   (:func:`solo_d2.modeling.postprocessing.sparse_matrix_nms`, the model's own, on the pairs of
   masks that intersect) between instances that no single tile saw together: pairs that one tile
   saw were already decayed by that tile's own Matrix NMS, and are not decayed twice (the
   whole-image pass counts as one more tile, seeing the whole image).

Memory: masks stay cropped to their boxes (:class:`~solo_d2.inference.cropped_masks.CroppedMasks`);
pairs are found from boxes in chunks (never a K x K matrix) and only pairs whose boxes overlap
are compared, pixel by pixel inside the overlap of the two boxes.
"""
import math
from typing import List, Tuple

import numpy as np
import torch

from ..modeling.postprocessing import sparse_matrix_nms
from .cropped_masks import CroppedMasks

__all__ = ["tile_windows", "overlapping_pairs", "cut_by_tile_edge", "cover_fraction", "parts_of_whole",
           "merge_seams", "whole_image_nms"]

#: Rows of boxes compared with all boxes at once by :func:`overlapping_pairs` (bounds its memory
#: at CHUNK x K booleans).
CHUNK = 512


def tile_windows(height: int, width: int, tile: int, overlap: int) -> List[Tuple[int, int, int, int]]:
    """The (x0, y0, x1, y1) windows (x1, y1 exclusive) of ``tile`` x ``tile`` tiles covering an
    (height, width) image, neighbours overlapping by at least ``overlap`` pixels: a stride of
    ``tile - overlap``, the last tile of a row / column moved back to end at the image border (so
    it may overlap more); one tile covers a side not longer than ``tile``. Row-major order."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile size {tile}), got {overlap}")

    def starts(size):
        if size <= tile:
            return [0]
        stride = tile - overlap
        n = math.ceil((size - tile) / stride) + 1
        return [min(k * stride, size - tile) for k in range(n)]

    return [(x, y, min(x + tile, width), min(y + tile, height))
            for y in starts(height) for x in starts(width)]


def overlapping_pairs(boxes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)``, ``i < j``, of (K, 4) XYXY boxes (x1, y1 exclusive) that share at
    least one pixel; compared :data:`CHUNK` rows at a time."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    rows, cols = [], []
    idx = np.arange(len(boxes))
    for start in range(0, len(boxes), CHUNK):
        b = boxes[start:start + CHUNK]
        hit = ((b[:, None, 0] < boxes[None, :, 2]) & (boxes[None, :, 0] < b[:, None, 2])
               & (b[:, None, 1] < boxes[None, :, 3]) & (boxes[None, :, 1] < b[:, None, 3])
               & (idx[None, :] > idx[start:start + CHUNK, None]))
        r, c = np.nonzero(hit)
        rows.append(r + start)
        cols.append(c)
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)


class _UnionFind:
    def __init__(self, n):
        self.parent = list(range(n))

    def find(self, a):
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def cut_by_tile_edge(boxes: np.ndarray, windows: np.ndarray, image_size) -> np.ndarray:
    """(K,) bool: whether each mask (its (K, 4) box) touches an edge of its tile (``windows``,
    (K, 4)) that is not an edge of the image, i.e. may be cut there."""
    h, w = image_size
    b, win = np.asarray(boxes), np.asarray(windows)
    return (((b[:, 0] <= win[:, 0]) & (win[:, 0] > 0)) | ((b[:, 1] <= win[:, 1]) & (win[:, 1] > 0))
            | ((b[:, 2] >= win[:, 2]) & (win[:, 2] < w)) | ((b[:, 3] >= win[:, 3]) & (win[:, 3] < h)))


def cover_fraction(masks: torch.Tensor, covers: torch.Tensor, cover_areas: torch.Tensor) -> torch.Tensor:
    """(R, C) float32: for each pair, the pixels in both masks / the smaller of the two masks'
    areas (0 where either is empty), from one matrix product.

    Args:
        masks: (R, h, w) bool, masks lying wholly inside the (h, w) window (a tile's detections).
        covers: (C, h, w) bool, other masks' parts inside the same window
            (:meth:`CroppedMasks.crop`).
        cover_areas: (C,) the whole areas of the covers (also what lies outside the window).
    """
    m = masks.flatten(1).float()
    inter = m @ covers.flatten(1).float().t()
    smaller = torch.minimum(m.sum(1)[:, None], torch.as_tensor(cover_areas, dtype=torch.float32)[None])
    return torch.where(smaller > 0, inter / smaller.clamp(min=1), torch.zeros(()))


def parts_of_whole(tile_masks: torch.Tensor, boxes: np.ndarray, window, whole: CroppedMasks,
                   min_cover: float) -> np.ndarray:
    """(R,) bool: which of a tile's detections are parts or copies of the whole-image instances
    ``whole`` (module docs, step 0).

    Args:
        tile_masks: (R, h, w) bool, the tile's masks; ``boxes``: (R, 4) their boxes in image
            coordinates; ``window``: the tile's (x0, y0, x1, y1), of size (h, w).
        whole: the kept whole-image instances' masks, of the image.
        min_cover: intersection / smaller area from which a detection lies in (or holds) one.
    """
    areas = torch.as_tensor(whole.areas(), dtype=torch.float32)
    cover = cover_fraction(tile_masks, torch.as_tensor(whole.crop(window)), areas)  # (R, C)
    cut = cut_by_tile_edge(boxes, np.tile(np.asarray(window)[None], (len(boxes), 1)), whole.image_size)
    copy = tile_masks.flatten(1).sum(1)[:, None] >= 0.5 * areas[None]
    return ((cover >= min_cover) & (torch.as_tensor(cut)[:, None] | copy)).any(dim=1).numpy()


def merge_seams(masks: CroppedMasks, scores: np.ndarray, classes: np.ndarray, tiles: np.ndarray,
                windows: np.ndarray, merge_iou: float, merge_cover: float = 2.0,
                across_classes: bool = False):
    """Merge the detections that two tiles made of one object (module docs, step 1).

    Args:
        masks: K masks in image coordinates.
        scores: (K,) float; classes: (K,) int; tiles: (K,) int, the tile of each detection.
        windows: (T, 4) the tiles' windows (:func:`tile_windows`).
        merge_iou: IoU inside the two tiles' common region from which two detections are one
            object (> 1: never merge).
        merge_cover: intersection / smaller area inside that region from which a detection cut
            by a tile edge and another are one object (> 1: IoU only).
        across_classes: also merge detections of different classes (the group takes its best
            part's class).
    Returns:
        ``(masks, scores, classes, seen_by)``: the merged instances (first those not merged, in
        their order, then the merged groups), ``seen_by`` a (K', T) bool array: which tiles
        each instance comes from.
    """
    k, t = len(masks), len(windows)
    windows = np.asarray(windows).reshape(-1, 4)
    groups = _UnionFind(k)
    i, j = overlapping_pairs(masks.boxes)
    keep = (tiles[i] != tiles[j]) & ((classes[i] == classes[j]) | across_classes)
    i, j = i[keep], j[keep]
    wi, wj = windows[tiles[i]], windows[tiles[j]]
    common = np.concatenate([np.maximum(wi[:, :2], wj[:, :2]), np.minimum(wi[:, 2:], wj[:, 2:])], 1)
    # Best pairs first (by the lower of their two scores), and a group takes at most one
    # detection of each tile: the model's own low-scored variants of an object do not chain
    # onto its best detection.
    order = np.argsort(-np.minimum(scores[i], scores[j]), kind="stable")
    cut = cut_by_tile_edge(masks.boxes, windows[tiles], masks.image_size)
    group_tiles = {a: 1 << int(tiles[a]) for a in range(k)}  # root -> bit set of its tiles
    for a, b, win in zip(i[order].tolist(), j[order].tolist(), common[order]):
        ra, rb = groups.find(a), groups.find(b)
        if ra == rb or group_tiles[ra] & group_tiles[rb]:
            continue
        inter = masks.intersection(a, b, win)
        if inter == 0:
            continue
        area_a, area_b = masks.area_in(a, win), masks.area_in(b, win)
        fragment = (cut[a] or cut[b]) and inter >= merge_cover * min(area_a, area_b)
        if fragment or inter >= merge_iou * (area_a + area_b - inter):
            groups.union(a, b)
            group_tiles[groups.find(a)] = group_tiles[ra] | group_tiles[rb]
    roots = np.array([groups.find(a) for a in range(k)], dtype=np.int64)
    seen_by = np.zeros((k, t), dtype=bool)
    seen_by[np.arange(k), tiles] = True
    single = np.flatnonzero(np.bincount(roots, minlength=k)[roots] == 1)
    out_boxes, out_bitmaps = [masks.boxes[single]], [masks.bitmaps[a] for a in single]
    out_scores, out_classes, out_seen = [scores[single]], [classes[single]], [seen_by[single]]
    merged_roots = np.unique(roots[np.bincount(roots, minlength=k)[roots] > 1])
    if len(merged_roots):
        for r in merged_roots:
            members = np.flatnonzero(roots == r)
            best = members[np.argmax(scores[members])]
            complete = members[~cut[members]]
            if len(complete):  # the object seen whole: its best-scored complete part as it is
                part = complete[np.argmax(scores[complete])]
                box, bitmap = masks.boxes[part], masks.bitmaps[part]
            else:  # every part cut by a tile edge: they complete each other
                box, bitmap = masks.union(members)
            out_boxes.append(box[None])
            out_bitmaps.append(bitmap)
            out_scores.append(scores[best:best + 1])
            out_classes.append(classes[best:best + 1])
            out_seen.append(seen_by[members].any(axis=0, keepdims=True))
    merged = CroppedMasks(np.concatenate(out_boxes), out_bitmaps, masks.image_size)
    return (merged, np.concatenate(out_scores), np.concatenate(out_classes),
            np.concatenate(out_seen))


def whole_image_nms(masks: CroppedMasks, scores: np.ndarray, classes: np.ndarray,
                    seen_by: np.ndarray, kernel: str = "gaussian", sigma: float = 2.0) -> np.ndarray:
    """Matrix NMS over the whole image between instances that no tile saw together (module
    docs, step 2).

    Args:
        masks, scores, classes, seen_by: as :func:`merge_seams` returns them; ``scores``
            descending.
    Returns:
        (K,) float32 decayed scores.
    """
    i, j = overlapping_pairs(masks.boxes)
    keep = (classes[i] == classes[j]) & ~(seen_by[i] & seen_by[j]).any(axis=1)
    i, j = i[keep], j[keep]
    areas = masks.areas()
    inter = np.array([masks.intersection(a, b) for a, b in zip(i.tolist(), j.tolist())],
                     dtype=np.float64)
    hit = inter > 0
    i, j, inter = i[hit], j[hit], inter[hit]
    ious = inter / np.maximum(areas[i] + areas[j] - inter, 1)
    pairs = torch.as_tensor(np.stack([i, j]), dtype=torch.int64).reshape(2, -1)
    sparse_ious = torch.sparse_coo_tensor(pairs, torch.as_tensor(ious, dtype=torch.float32),
                                          (len(scores), len(scores)), check_invariants=True)
    decayed = sparse_matrix_nms(torch.as_tensor(scores, dtype=torch.float32), sparse_ious,
                                kernel=kernel, sigma=sigma)
    return decayed.numpy()
