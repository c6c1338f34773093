"""SOLO inference: from category grids and mask features to Detectron2 ``Instances``.

Per image, in the reference's order (the official repository's ``get_seg_single``,
mmdetection 3.3.0's ``SOLOHead._predict_by_feat_single``): point NMS on the category grids,
score threshold, the candidates' masks only (never all S^2) at the finest mask size, area
filter, maskness rescoring, the top ``nms_pre`` by rescored score, Matrix NMS, top
``max_per_image``; then the kept soft masks are upsampled to the padded input, cropped to the
image, resized to the requested output size and thresholded. Boxes are derived from the final
masks. ``nms_pre_before_masks`` (opt-in) takes the top ``nms_pre`` by category score before
forming masks instead, which bounds the masks formed (BENCHMARKS.md).
"""
from contextlib import nullcontext
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.structures import Boxes, Instances

from .layers import host_reads_are_free, masks_to_boxes, read_on_host, solo_cfg_args
from .mask_paste import paste_masks

__all__ = ["point_nms", "matrix_nms", "sparse_matrix_nms", "category_strides", "SOLOPostProcessor",
           "float32_region"]


def float32_region(device: torch.device):
    """The context post-processing runs in: autocast off on ``device``'s type, whatever the
    caller runs under (a float16 ``mm`` of masks above 65,504 pixels overflows to inf, and
    inf * 0 gives NaN scores). Nothing while exporting or tracing (the graph has no autocast)."""
    if torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return nullcontext()
    return torch.autocast(torch.device(device).type, enabled=False)


def category_strides(feature_strides: Sequence[int]) -> List[int]:
    """Strides after the head's resizing: the first level takes the second's stride and the
    last the one before it ([4, 8, 16, 32, 64] -> [8, 8, 16, 32, 32])."""
    s = list(feature_strides)
    if len(s) > 1:
        s[0], s[-1] = s[1], s[-2]
    return s


def point_nms(probs: torch.Tensor, kernel: int = 2) -> torch.Tensor:
    """Keep a cell's score only where it is the max of its 2x2 neighbourhood (others -> 0).

    Args:
        probs: (..., C, S, S) category probabilities.
    Returns:
        tensor of the same shape.
    """
    hmax = F.max_pool2d(probs, (kernel, kernel), stride=1, padding=1)
    keep = hmax[..., :-1, :-1] == probs
    return probs * keep


def matrix_nms(
    masks: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    kernel: str = "gaussian",
    sigma: float = 2.0,
) -> torch.Tensor:
    """Matrix NMS (SOLOv2): decay each mask's score by its overlap with higher-scored masks.

    Args:
        masks: (K, H, W) bool, sorted by descending ``scores``.
        labels: (K,) int64 classes (only masks of the same class decay each other).
        scores: (K,) float, descending.
        kernel: "gaussian" (exp(-sigma * iou^2) / exp(-sigma * comp^2)) or "linear"
            ((1 - iou) / (1 - comp)).
    Returns:
        (K,) float: the decayed scores.

    Runs with autocast off (:func:`float32_region`), whoever calls it: areas and intersections
    exceed float16's range.
    """
    with float32_region(masks.device):
        return _matrix_nms(masks, labels, scores.float(), kernel, sigma)


def _matrix_nms(masks, labels, scores, kernel, sigma):
    k = masks.shape[0]
    flat = masks.flatten(1).float()  # float32: areas exceed float16
    area = flat.sum(1)
    inter = _same_class_intersections(flat, labels)
    union = area[:, None] + area[None, :] - inter
    # Pairs (i, j) with i scored above j (the strict upper triangle, from an index comparison:
    # `triu` lacks an exporter or runtime kernel in places), of the same class.
    order = torch.arange(k, device=masks.device)
    above = (order[:, None] < order[None, :]) & (labels[:, None] == labels[None, :])
    decay_iou = inter / union.clamp(min=1) * above
    # How much each higher-scored mask i was itself suppressed: max IoU with masks above it. A
    # zero row keeps the reduction defined for K = 0 and changes nothing (IoUs are >= 0).
    zero = decay_iou.new_zeros((1, k))
    comp = torch.cat([zero, decay_iou]).max(dim=0).values[:, None]  # (K, 1): row i's
    decay = _decay(decay_iou, comp, kernel, sigma)
    # A row of ones keeps the reduction defined for K = 0 and changes nothing: every column's
    # minimum is <= 1 (row 0, the best mask, is never compensated).
    return scores * torch.cat([torch.ones_like(zero), decay]).min(dim=0).values


def _decay(iou: torch.Tensor, comp: torch.Tensor, kernel: str, sigma: float) -> torch.Tensor:
    """Matrix NMS's decay factor of a mask j by a higher-scored mask i: ``iou`` their IoU,
    ``comp`` mask i's own max IoU with the masks above it (broadcast together)."""
    if kernel == "gaussian":
        return torch.exp(-sigma * (iou**2 - comp**2))
    if kernel == "linear":
        return (1 - iou) / (1 - comp).clamp(min=1e-6)
    raise ValueError(f"MODEL.SOLO.NMS_KERNEL must be 'gaussian' or 'linear', got {kernel!r}")


def sparse_matrix_nms(scores: torch.Tensor, ious: torch.Tensor, kernel: str = "gaussian",
                      sigma: float = 2.0) -> torch.Tensor:
    """:func:`matrix_nms` from a sparse IoU matrix instead of (K, K) masks: the same decayed
    scores, in memory proportional to the number of overlapping pairs.

    A pair of masks that do not intersect changes nothing in Matrix NMS (its factor
    ``decay(0, comp) >= 1`` never lowers the minimum, which is at most 1), so only the pairs
    that do need an entry.

    Args:
        scores: (K,) float, descending.
        ious: (K, K) sparse COO float tensor; entry (i, j), ``i < j`` (the higher-scored mask
            first), is the IoU of masks i and j, given once for each pair that decays each
            other (the caller decides which: of the same class, say).
    Returns:
        (K,) float: the decayed scores.
    """
    k = scores.shape[0]
    if ious.layout != torch.sparse_coo or tuple(ious.shape) != (k, k):
        raise ValueError(f"sparse_matrix_nms: ious must be a ({k}, {k}) sparse COO tensor (K = "
                         f"len(scores)), got {ious.layout} of shape {tuple(ious.shape)}")
    entries = ious.coalesce()
    if entries._nnz() != ious._nnz():
        raise ValueError("sparse_matrix_nms: ious gives a pair more than once")
    above, below = entries.indices()
    if bool((above >= below).any()):
        raise ValueError("sparse_matrix_nms: every entry (i, j) of ious must have i < j (the "
                         "higher-scored mask first)")
    with float32_region(scores.device):
        scores = scores.float()
        values = entries.values().float()
        comp = scores.new_zeros(k).scatter_reduce(0, below, values, "amax", include_self=True)
        factors = _decay(values, comp[above], kernel, sigma)
        decay = scores.new_ones(k).scatter_reduce(0, below, factors, "amin", include_self=True)
        return scores * decay


def _same_class_intersections(flat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(K, P) float 0/1 masks, (K,) labels -> (K, K) float pixel intersections; entries of pairs
    of different classes may be 0 (Matrix NMS ignores them).

    An exported graph, and an accelerator (:func:`host_reads_are_free` False), compute every
    pair in one product (static shapes, no host read; Matrix NMS masks out the pairs of
    different classes). On the CPU only the pairs of each class present are computed (one
    product per class: with candidates spread over C classes, about 1/C of the work, at the
    cost of reading the classes on the host). The counts are integers below 2^24 from 0/1
    inputs, exact in float32 (TF32 too: 0/1 is exact in its 10-bit mantissa, and it
    accumulates in float32) in any summation order, so both give the same same-class entries.
    """
    if (
        torch.compiler.is_exporting()
        or flat.shape[0] == 0
        or not host_reads_are_free(flat.device)
    ):
        return flat @ flat.t()
    classes = labels.unique()
    if classes.numel() == 1:
        return flat @ flat.t()
    inter = flat.new_zeros((flat.shape[0], flat.shape[0]))
    for c in classes:  # classes, not cells: at most C iterations
        members = (labels == c).nonzero().squeeze(1)
        f = flat[members]
        inter[members[:, None], members[None, :]] = f @ f.t()
    return inter


class SOLOPostProcessor:
    """Turns one image's head outputs into ``Instances``.

    Args:
        num_classes: C.
        num_grids: S per level.
        min_areas: minimum mask area per level, in pixels of the finest mask resolution: a
            candidate whose binary mask has ``area <= min_areas[level]`` is dropped. The
            reference uses each level's category stride ([8, 8, 16, 32, 32]), which
            :meth:`from_config` derives from the backbone's feature strides.
        score_thresh, mask_thresh, update_thresh, max_per_image, nms_pre, nms_kernel,
        nms_sigma: see ``MODEL.SOLO.*_TEST``, ``MAX_PER_IMAGE`` and ``NMS_*`` in
        :mod:`solo_d2.config`.
        nms_pre_before_masks: apply the ``nms_pre`` top-k to the category scores before forming
            masks (``MODEL.SOLO.NMS_PRE_BEFORE_MASKS``); False (default) applies it where the
            reference does, after the area filter and maskness rescoring.
    """

    @configurable
    def __init__(
        self,
        num_classes: int,
        num_grids: Sequence[int],
        min_areas: Sequence[float],
        *,
        score_thresh: float = 0.1,
        mask_thresh: float = 0.5,
        update_thresh: float = 0.05,
        max_per_image: int = 100,
        nms_pre: int = 500,
        nms_kernel: str = "gaussian",
        nms_sigma: float = 2.0,
        nms_pre_before_masks: bool = False,
    ):
        if nms_kernel not in ("gaussian", "linear"):
            raise ValueError(
                f"MODEL.SOLO.NMS_KERNEL must be 'gaussian' or 'linear', got {nms_kernel!r}"
            )
        if len(min_areas) != len(num_grids):
            raise ValueError(
                f"SOLOPostProcessor: {len(min_areas)} min_areas for {len(num_grids)} levels"
            )
        self.num_classes = num_classes
        self.num_grids = list(num_grids)
        self.min_areas = list(min_areas)
        self.score_thresh = score_thresh
        self.mask_thresh = mask_thresh
        self.nms_pre = nms_pre
        self.nms_kernel = nms_kernel
        self.nms_sigma = nms_sigma
        self.update_thresh = update_thresh
        self.max_per_image = max_per_image
        self.nms_pre_before_masks = nms_pre_before_masks
        self._constants = {}  # (device, dtype) -> min_areas tensor, made once per device

    def min_areas_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(L,) ``min_areas`` as a tensor on ``device``, made once per (device, dtype): no
        host-to-device copy per call. Not cached while exporting (a graph constant)."""
        if torch.compiler.is_exporting():
            return torch.as_tensor(self.min_areas, device=device, dtype=dtype)
        key = (torch.device(device), dtype)
        if key not in self._constants:
            with torch.inference_mode(False):  # a normal tensor, usable outside inference mode
                self._constants[key] = torch.as_tensor(self.min_areas, dtype=dtype).to(device)
        return self._constants[key]

    @classmethod
    def from_config(cls, cfg, feature_strides: Sequence[int]):
        """``feature_strides``: the backbone strides of ``MODEL.SOLO.IN_FEATURES``."""
        sc = cfg.MODEL.SOLO
        return {
            "min_areas": category_strides(feature_strides),
            "score_thresh": sc.SCORE_THRESH_TEST,
            "mask_thresh": sc.MASK_THRESH_TEST,
            "update_thresh": sc.UPDATE_THRESH_TEST,
            **solo_cfg_args(cfg, "NUM_CLASSES", "NUM_GRIDS", "NMS_PRE", "NMS_KERNEL", "NMS_SIGMA",
                            "MAX_PER_IMAGE", "NMS_PRE_BEFORE_MASKS"),
        }

    def __call__(self, cate_logits, mask_fn, mask_size, padded_size, image_size, output_size) -> Instances:
        """:meth:`predict` (the same arguments) as ``Instances`` of ``output_size`` with
        ``pred_masks`` (R, height, width) bool, ``scores`` (R,) float32, ``pred_classes`` (R,)
        int64, ``pred_boxes`` Boxes (R, 4)."""
        masks, scores, classes, boxes = self.predict(
            cate_logits, mask_fn, mask_size, padded_size, image_size, output_size
        )
        result = Instances(tuple(int(s) for s in output_size))
        result.pred_masks = masks
        result.scores = scores
        result.pred_classes = classes
        result.pred_boxes = Boxes(boxes)
        return result

    def predict(
        self,
        cate_logits: List[torch.Tensor],
        mask_fn: Callable[[int, torch.Tensor], torch.Tensor],
        mask_size: Tuple[int, int],
        padded_size: Tuple[int, int],
        image_size: Tuple[int, int],
        output_size: Tuple[int, int],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image's detections as plain tensors (what an exported graph returns).

        Args:
            cate_logits: per level (C, S_l, S_l) category logits of this image.
            mask_fn: ``mask_fn(level, cells)`` -> (K, H_0, W_0) soft masks of those cells
                (cells: (K,) int64, k = i * S + j; K may be 0), at ``mask_size`` (the head
                resizes where the reference does; a mask of another size is resized here,
                bilinearly).
            mask_size: (H_0, W_0), the finest mask resolution (stride 4); candidates of all
                levels are compared at this size.
            padded_size: (Hp, Wp) of the padded input tensor.
            image_size: (h, w) of this image inside the padded tensor.
            output_size: (height, width) requested for the output.
        Returns:
            ``(masks, scores, classes, boxes)``: (R, height, width) bool, (R,) float32, (R,)
            int64, (R, 4) float32 XYXY boxes of the masks. R may be 0.

        Written to export (``torch.export``, the ONNX exporter): no Python branch on a tensor's
        values except the eager-only memory bound for more than ``nms_pre`` candidates (same
        result, :meth:`_top_rescored_in_chunks`), sizes that depend on the data only through
        ``nonzero``, and the levels handled by one call of ``mask_fn`` per level (a static
        loop) on that level's candidates (possibly none).

        Runs with autocast off (:func:`float32_region`) whoever calls it, in float32. Host
        reads (syncs on an accelerator) are bounded: on a device whose host reads are not free
        (:func:`~solo_d2.modeling.layers.host_reads_are_free`), 4 (candidates, their level
        counts, the area filter, the update threshold), or 5 plus 1 per rescoring chunk when
        more than ``nms_pre`` candidates are rescored (one chunk there, up to about 4,000
        candidates at 800 x 1333), whatever the number of classes (tests/test_sync_census.py).
        """
        with float32_region(cate_logits[0].device):
            return self._predict(cate_logits, mask_fn, mask_size, padded_size, image_size,
                                 output_size)

    def _predict(self, cate_logits, mask_fn, mask_size, padded_size, image_size, output_size):
        device = cate_logits[0].device
        c = self.num_classes
        # float32 throughout (areas and IoUs overflow fp16 when the model runs under autocast)
        probs = [
            point_nms(x.float().sigmoid()).permute(1, 2, 0).reshape(-1, c) for x in cate_logits
        ]
        level_of = torch.cat(
            [torch.full((p.shape[0],), i, device=device) for i, p in enumerate(probs)]
        )
        cell_of = torch.cat([torch.arange(p.shape[0], device=device) for p in probs])
        probs = torch.cat(probs)

        # Candidates: (cell, class) pairs above the threshold, in (cell, class) order (opt-in:
        # at most nms_pre of them, the best by category score, best first).
        row, cls = (probs > self.score_thresh).nonzero(as_tuple=True)
        scores = probs[row, cls]
        if self.nms_pre_before_masks:
            top = scores.sort(descending=True, stable=True).indices[: self.nms_pre]
            scores, row, cls = scores[top], row[top], cls[top]
        levels, cells = level_of[row], cell_of[row]

        # Candidates in (cell, class) order are in level order (cells are numbered level by
        # level); a top-k by score is not.
        by_level = not self.nms_pre_before_masks
        if not torch.compiler.is_exporting() and scores.numel() > self.nms_pre:
            # Eager only (an exported graph forms all candidates' masks at once): bound the
            # memory of many candidates; the result is the same.
            top = self._top_rescored_in_chunks(scores, levels, cells, mask_fn, mask_size, by_level)
            scores, cls, levels, cells = scores[top], cls[top], levels[top], cells[top]
            by_level = False
        soft = self._soft_masks(levels, cells, mask_fn, mask_size, by_level)
        scores, kept, binary = self._rescore(scores, levels, soft)

        # Indices into the candidates are composed; the big mask tensors are gathered once.
        # The reference's pre-NMS top-k: after the area filter and maskness rescoring.
        idx = kept.nonzero().squeeze(1)
        idx = idx[scores[idx].sort(descending=True, stable=True).indices[: self.nms_pre]]
        scores, cls = scores[idx], cls[idx]
        scores = matrix_nms(binary[idx], cls, scores, self.nms_kernel, self.nms_sigma)
        keep = (scores >= self.update_thresh).nonzero().squeeze(1)
        scores, order = scores[keep].sort(descending=True, stable=True)
        order = keep[order[: self.max_per_image]]
        scores, cls, soft = scores[: self.max_per_image], cls[order], soft[idx[order]]

        masks = self.paste_masks(soft, padded_size, image_size, output_size)
        return masks, scores.float(), cls.long(), masks_to_boxes(masks)

    #: candidates whose masks are formed at once on the CPU when more than ``nms_pre`` must be
    #: rescored (256 masks of 200 x 336 floats: 69 MB)
    RESCORE_CHUNK = 256
    #: bytes of soft masks formed at once on an accelerator when rescoring (1 GiB: about 4,000
    #: candidates at 800 x 1333, so one chunk, one host read, for any usual count)
    RESCORE_BYTES_DEVICE = 2**30

    def rescore_chunk(self, device: torch.device, mask_size: Tuple[int, int]) -> int:
        """Candidates rescored at once: ``RESCORE_CHUNK`` on the CPU (its memory and caches);
        on an accelerator as many as ``RESCORE_BYTES_DEVICE`` of float32 soft masks hold (at
        least ``RESCORE_CHUNK``), since each chunk costs a host read (a sync)."""
        if host_reads_are_free(device):
            return self.RESCORE_CHUNK
        per_mask = 4 * int(mask_size[0]) * int(mask_size[1])
        return max(self.RESCORE_CHUNK, self.RESCORE_BYTES_DEVICE // max(per_mask, 1))

    def _top_rescored_in_chunks(self, scores, levels, cells, mask_fn, mask_size, by_level):
        """Indices of the (at most) ``nms_pre`` candidates that pass the area filter with the
        best rescored scores, best first (ties: candidate order): the candidates are rescored
        :meth:`rescore_chunk` at a time without keeping their masks (all at once can take
        gigabytes), so only the kept ones' masks are formed again. Same selection and order as
        rescoring all of them at once."""
        chunk = self.rescore_chunk(scores.device, mask_size)
        parts = []
        for i in range(0, scores.numel(), chunk):
            s, lv = scores[i : i + chunk], levels[i : i + chunk]
            soft = self._soft_masks(lv, cells[i : i + chunk], mask_fn, mask_size, by_level)
            parts.append(self._rescore(s, lv, soft)[:2])
        rescored = torch.cat([r for r, _ in parts])
        top = torch.cat([k for _, k in parts]).nonzero().squeeze(1)
        return top[rescored[top].sort(descending=True, stable=True).indices[: self.nms_pre]]

    def _soft_masks(self, levels, cells, mask_fn, mask_size, by_level=False):
        """(K, H_0, W_0) float soft masks of candidates in any order of levels (``by_level``:
        the caller knows they are in level order): one ``mask_fn`` call per level on that
        level's candidates, the levels' masks concatenated once.

        Eager: the candidates' level counts are read on the host once (one sync), the
        candidates are put in level order on the device when they are not, and a level without
        candidates costs nothing. Exporting: each level's candidates from ``nonzero`` and a
        ``mask_fn`` call for every level (the counts are not known)."""
        if torch.compiler.is_exporting():
            parts, sels = [], []
            for level in range(len(self.num_grids)):
                sel = (levels == level).nonzero().squeeze(1)
                parts.append(self._level_masks(mask_fn, level, cells[sel], mask_size))
                sels.append(sel)
            stacked, order = torch.cat(parts), torch.cat(sels)
            return stacked.new_empty(stacked.shape).index_put((order,), stacked)
        order = None if by_level else levels.argsort(stable=True)
        counts = read_on_host(torch.bincount(levels, minlength=len(self.num_grids)))
        in_order = cells if order is None else cells[order]
        parts = [
            self._level_masks(mask_fn, level, c, mask_size)
            for level, c in enumerate(in_order.split(counts))
            if c.numel()
        ]
        if not parts:
            return torch.zeros((cells.shape[0], *mask_size), device=cells.device)
        stacked = torch.cat(parts) if len(parts) > 1 else parts[0]
        if order is None:
            return stacked
        return stacked.new_empty(stacked.shape).index_put((order,), stacked)

    @staticmethod
    def _level_masks(mask_fn, level, cells, mask_size):
        """``mask_fn``'s float masks of one level's cells, at ``mask_size``."""
        m = mask_fn(level, cells).float()
        if m.shape[-2:] != tuple(mask_size):
            m = F.interpolate(m[:, None], size=tuple(mask_size), mode="bilinear")[:, 0]
        return m

    def _rescore(self, scores, levels, soft):
        """Area filter and maskness rescoring of candidates with soft masks ``soft``.

        Returns ``(rescored, kept, binary)``: (K,) scores times maskness; (K,) bool, False
        where the binary mask's area is <= its level's minimum area (dropped); (K, H, W) bool,
        the thresholded masks.
        """
        binary, area, mass = self._binary_area_mass(soft)
        area = area.to(scores.dtype)
        min_areas = self.min_areas_on(scores.device, scores.dtype)
        maskness = mass / area.clamp(min=1)
        return scores * maskness, area > min_areas[levels], binary

    #: masks thresholded and summed at once on the CPU (8 masks of 200 x 336 floats: ~2 MB, a
    #: core's L2 cache)
    CPU_BLOCK = 8

    def _binary_area_mass(self, soft):
        """(K, H, W) soft masks -> ``(binary, area, mass)``: (K, H, W) bool ``soft >
        mask_thresh``; (K,) int64 pixels above the threshold; (K,) float sum of the soft values
        above it.

        On the CPU in eager mode, ``CPU_BLOCK`` masks at a time, so that each block is read from
        memory once and summed while cached (three passes over all K masks at once: ~4x the
        time at K = 500, 200 x 336). Each mask's sums are reduced over its own pixels either way.
        """
        k = soft.shape[0]
        if soft.device.type != "cpu" or torch.compiler.is_exporting() or k <= self.CPU_BLOCK:
            binary = soft > self.mask_thresh
            return binary, binary.sum(dim=(1, 2)), (soft * binary).sum(dim=(1, 2))
        binary = torch.empty(soft.shape, dtype=torch.bool)
        area = torch.empty((k,), dtype=torch.int64)
        mass = torch.empty((k,), dtype=soft.dtype)
        for i in range(0, k, self.CPU_BLOCK):  # blocks of masks, not cells or pixels
            s = soft[i : i + self.CPU_BLOCK]
            b = torch.gt(s, self.mask_thresh, out=binary[i : i + self.CPU_BLOCK])
            torch.sum(b, dim=(1, 2), out=area[i : i + self.CPU_BLOCK])
            torch.sum(s * b, dim=(1, 2), out=mass[i : i + self.CPU_BLOCK])
        return binary, area, mass

    def paste_masks(self, soft, padded_size, image_size, output_size):
        """(R, H0, W0) soft masks -> (R, height, width) bool: upsample to the padded input,
        crop to the image, resize to the output size, threshold (:mod:`.mask_paste`: on the CPU
        only inside each mask's reachable window, with the same result; it reads each window's
        bounds on the host, so only where host reads are free)."""
        return paste_masks(soft, padded_size, image_size, output_size, self.mask_thresh,
                           box_limited=host_reads_are_free(soft.device))
