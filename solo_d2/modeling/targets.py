"""SOLO grid targets: which cell of which level must predict which instance.

For each GT instance (on the padded canvas of the batch):

- scale = sqrt(w * h) of its box; it is assigned to every level whose inclusive scale range
  contains the scale (ranges overlap, so one object may be positive on two levels);
- centre = mass centre of its mask (pixel-index coordinates, full input resolution);
  centre cell = floor(centre / canvas_size * S);
- positive cells = the cells covered by centre +- 0.5 * sigma * (box w, box h), clipped to one
  cell around the centre cell (1 to 9 cells);
- mask target = the mask resized (bilinear, then >= 0.5) from the padded canvas to the level's
  mask resolution;
- when two instances of one image claim the same cell, the later one in annotation order wins
  (reference behaviour); zero-area masks are never positive.

Everything is vectorised over the instances of the whole batch; the only Python loops run over
images (to paste masks onto the canvas) and over levels.
"""
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.structures import BitMasks, Instances, PolygonMasks

from .layers import solo_cfg_args

__all__ = ["LevelTargets", "SOLOTargetGenerator", "assign_cells"]


@dataclass
class LevelTargets:
    """Targets of one level for a batch of N images, grid S, mask resolution (H, W).

    Attributes:
        labels: (N, S, S) int64; the class 0..C-1 of the instance owning each cell, C for none.
        pos_img: (K,) int64; image index of each positive cell, sorted by (image, cell).
        pos_cell: (K,) int64; cell index k = i * S + j of each positive cell.
        pos_inst: (K,) int64; row of ``masks`` holding that cell's mask target.
        masks: (U, H, W) bool; mask targets of the U instances positive on this level.
    """

    labels: torch.Tensor
    pos_img: torch.Tensor
    pos_cell: torch.Tensor
    pos_inst: torch.Tensor
    masks: torch.Tensor

    @property
    def num_pos(self) -> int:
        return self.pos_cell.numel()

    def pos_masks(self) -> torch.Tensor:
        """(K, H, W) bool: the mask target of every positive cell."""
        return self.masks[self.pos_inst]


def _gt_bitmasks(inst: Instances, canvas: Tuple[int, int]) -> torch.Tensor:
    """(I, h, w) bool masks of one image's instances (image size, not padded), on the device of
    ``inst.gt_classes`` (the model's): polygons are rasterised on the host (Detectron2's
    ``BitMasks.from_polygon_masks``, pycocotools) and moved there."""
    gt = inst.gt_masks
    h, w = inst.image_size
    device = inst.gt_classes.device
    if isinstance(gt, PolygonMasks):
        gt = BitMasks.from_polygon_masks(gt, h, w).tensor.to(device)
    elif isinstance(gt, BitMasks):
        gt = gt.tensor
    if gt.dim() != 3:
        raise ValueError(f"gt_masks must be (I, H, W), got shape {tuple(gt.shape)}")
    if gt.shape[1] > canvas[0] or gt.shape[2] > canvas[1]:
        raise ValueError(f"gt_masks of size {tuple(gt.shape[1:])} exceed the batch canvas {canvas}")
    return gt.to(device).bool()


def _instance_geometry(inst: Instances, canvas: Tuple[int, int]):
    """One image's instances: ``(masks, area, cy, cx, bw, bh)``, all on ``inst.gt_classes``'s
    device: (I, h, w) bool masks; (I,) float64 areas and mass centres (pixel-index coordinates;
    float64: index sums of large masks exceed float32); (I,) float32 box widths and heights
    (``gt_boxes``, else the masks' extents, Detectron2's convention: x1 = last column + 1)."""
    device = inst.gt_classes.device
    m = _gt_bitmasks(inst, canvas)
    rows, cols = _row_col_sums(m)
    a = rows.sum(dim=1).to(torch.float64)
    ys = torch.arange(m.shape[1], device=device, dtype=torch.float64)
    xs = torch.arange(m.shape[2], device=device, dtype=torch.float64)
    cy = rows.to(torch.float64) @ ys / a.clamp(min=1)
    cx = cols.to(torch.float64) @ xs / a.clamp(min=1)
    if inst.has("gt_boxes"):
        box = inst.gt_boxes.tensor.to(device, torch.float32)
        bw, bh = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    else:
        bw, bh = _extent(cols > 0), _extent(rows > 0)
    return m, a, cy, cx, bw, bh


def _row_col_sums(masks: torch.Tensor):
    """(I, h) and (I, w) int32 foreground counts per row and per column (one pass each)."""
    u8 = masks.view(torch.uint8) if masks.dtype == torch.bool else masks.to(torch.uint8)
    return u8.sum(dim=2, dtype=torch.int32), u8.sum(dim=1, dtype=torch.int32)


class SOLOTargetGenerator:
    """Builds :class:`LevelTargets` for every level from a batch's GT instances."""

    @configurable
    def __init__(
        self,
        num_classes: int,
        num_grids: Sequence[int],
        scale_ranges: Sequence[Sequence[float]],
        sigma: float = 0.2,
    ):
        """
        Args:
            num_classes: C; GT classes must be in 0..C-1.
            num_grids: S per level, > 0.
            scale_ranges: inclusive (lo, hi) object-scale range per level, lo <= hi.
            sigma: centre-region factor (``MODEL.SOLO.SIGMA``).
        """
        if len(num_grids) != len(scale_ranges):
            raise ValueError(
                f"MODEL.SOLO.NUM_GRIDS has {len(num_grids)} entries but MODEL.SOLO.SCALE_RANGES "
                f"has {len(scale_ranges)}: give one per level"
            )
        if any(int(s) <= 0 for s in num_grids):
            raise ValueError(f"MODEL.SOLO.NUM_GRIDS must be positive, got {list(num_grids)}")
        for r in scale_ranges:
            if len(r) != 2 or r[0] > r[1]:
                raise ValueError(
                    f"MODEL.SOLO.SCALE_RANGES entries must be [lo, hi] with lo <= hi, got {r}"
                )
        self.num_classes = num_classes
        self.num_grids = list(num_grids)
        self.scale_ranges = [tuple(float(v) for v in r) for r in scale_ranges]
        self.sigma = sigma

    @classmethod
    def from_config(cls, cfg):
        return solo_cfg_args(cfg, "NUM_CLASSES", "NUM_GRIDS", "SCALE_RANGES", "SIGMA")

    @torch.no_grad()
    def __call__(
        self,
        gt_instances: List[Instances],
        canvas_size: Tuple[int, int],
        mask_sizes: List[Tuple[int, int]],
    ) -> List[LevelTargets]:
        """
        Args:
            gt_instances: N per-image Instances with ``gt_classes`` (int64, 0..C-1), ``gt_masks``
                (BitMasks or PolygonMasks, image size) and optionally ``gt_boxes`` (XYXY, input
                pixels; derived from the masks when absent).
            canvas_size: (Hc, Wc) of the padded batch tensor.
            mask_sizes: (H_l, W_l) of each level's mask prediction.
        Returns:
            One :class:`LevelTargets` per level.
        """
        if len(mask_sizes) != len(self.num_grids):
            raise ValueError(f"got {len(mask_sizes)} mask sizes for {len(self.num_grids)} levels")
        device = gt_instances[0].gt_classes.device if gt_instances else torch.device("cpu")

        # ---- all instances of the batch, in annotation order within each image ----
        # Per-instance geometry (:func:`_instance_geometry`) comes from per-row and per-column
        # counts of the (unpadded) masks, on the instances' device.
        masks, classes, img_of, area, cy, cx, bw, bh = [], [], [], [], [], [], [], []
        for b, inst in enumerate(gt_instances):
            if len(inst) == 0:
                continue
            for acc, x in zip((masks, area, cy, cx, bw, bh), _instance_geometry(inst, canvas_size)):
                acc.append(x)
            classes.append(inst.gt_classes.to(torch.int64))
            img_of.append(torch.full((len(inst),), b, dtype=torch.int64, device=device))

        def cat(xs, dtype):
            return torch.cat(xs).to(dtype) if xs else torch.zeros(0, dtype=dtype, device=device)

        classes, img_of = cat(classes, torch.int64), cat(img_of, torch.int64)
        area, cy, cx = cat(area, torch.float64), cat(cy, torch.float32), cat(cx, torch.float32)
        bw, bh = cat(bw, torch.float32), cat(bh, torch.float32)
        bad = classes[(classes < 0) | (classes >= self.num_classes)]
        if bad.numel():
            raise ValueError(
                f"GT class id {int(bad[0])} is outside 0..{self.num_classes - 1}: "
                f"MODEL.SOLO.NUM_CLASSES = {self.num_classes} disagrees with the dataset"
            )
        scale = (bw * bh).clamp(min=0).sqrt()
        valid = area > 0

        targets = []
        for level, (s, (lo, hi), (mh, mw)) in enumerate(
            zip(self.num_grids, self.scale_ranges, mask_sizes)
        ):
            on_level = valid & (scale >= lo) & (scale <= hi)
            targets.append(
                self._level_targets(
                    s, (mh, mw), on_level, masks, classes, img_of, cx, cy, bw, bh, canvas_size,
                    len(gt_instances),
                )
            )
        return targets

    def _level_targets(
        self, s, mask_size, on_level, masks, classes, img_of, cx, cy, bw, bh, canvas, n
    ):
        """``masks``: one (I_b, h_b, w_b) bool tensor per image that has instances; n images."""
        device = classes.device
        idx = on_level.nonzero().squeeze(1)  # instances of this level, in annotation order
        inst_of_pos, cell_of_pos, owner_of_pos = assign_cells(
            s, self.sigma, canvas, idx, img_of, cx, cy, bw, bh
        )
        owner = torch.full((n * s * s,), -1, dtype=torch.int64, device=device)
        owner[img_of[idx][inst_of_pos] * (s * s) + cell_of_pos] = owner_of_pos
        labels = torch.full((n * s * s,), self.num_classes, dtype=torch.int64, device=device)
        has = owner >= 0
        labels[has] = classes[owner[has]]

        flat = has.nonzero().squeeze(1)  # sorted by (image, cell)
        owners = owner[flat]
        used, pos_inst = torch.unique(owners, return_inverse=True)  # sorted: grouped by image
        resized = [torch.zeros((0, *mask_size), dtype=torch.bool, device=device)]
        start = 0
        for m in masks:  # per image: its used instances, resized from the canvas
            local = used[(used >= start) & (used < start + m.shape[0])] - start
            if local.numel():
                resized.append(_resize_masks(m[local], canvas, mask_size))
            start += m.shape[0]
        return LevelTargets(
            labels=labels.view(n, s, s),
            pos_img=flat // (s * s),
            pos_cell=flat % (s * s),
            pos_inst=pos_inst.view(-1),
            masks=torch.cat(resized),
        )


def assign_cells(s, sigma, canvas, idx, img_of, cx, cy, bw, bh):
    """Which instance owns each cell of one level's S x S grid (the assignment rule above).

    Args:
        s: grid number S.
        sigma: centre-region factor.
        canvas: (Hc, Wc) of the padded canvas the grid divides: numbers, or two (I,) float
            tensors giving each instance's own canvas (one image per canvas, as in analysis).
        idx: (I_l,) int64, the instances on this level, in annotation order (ascending).
        img_of, cx, cy, bw, bh: (I,) per instance of the batch: image index (int64), mass
            centre x / y (pixel-index coordinates) and box width / height (input pixels).
    Returns:
        inst_of_pos: (P,) int64 and cell_of_pos: (P,) int64: every cell each instance of
            ``idx`` would be positive on alone, as (row of ``idx``, cell index i * S + j),
            sorted by (instance, cell).
        owner_of_pos: (P,) int64: the instance (index into the (I,) arrays) that owns that
            cell of that instance's image: the latest instance claiming it ("later one wins").
            The instance is positive on the cell iff ``owner_of_pos == idx[inst_of_pos]``.
    """
    device = img_of.device
    hc, wc = (c[idx] if torch.is_tensor(c) else c for c in canvas)
    # Centre cell and centre region (in cells), clipped to one cell around the centre.
    ci = (cy[idx] * s / hc).floor().long().clamp(0, s - 1)
    cj = (cx[idx] * s / wc).floor().long().clamp(0, s - 1)
    half_h = 0.5 * sigma * bh[idx]
    half_w = 0.5 * sigma * bw[idx]
    top = ((cy[idx] - half_h) * s / hc).floor().long().clamp(min=0)
    down = ((cy[idx] + half_h) * s / hc).floor().long().clamp(max=s - 1)
    left = ((cx[idx] - half_w) * s / wc).floor().long().clamp(min=0)
    right = ((cx[idx] + half_w) * s / wc).floor().long().clamp(max=s - 1)
    top = torch.maximum(top, ci - 1)
    down = torch.minimum(down, ci + 1)
    left = torch.maximum(left, cj - 1)
    right = torch.minimum(right, cj + 1)

    # The region spans at most 3 x 3 cells: enumerate the 9 offsets from its top-left cell.
    off = torch.arange(3, device=device)
    rows = top[:, None, None] + off[None, :, None]  # (I_l, 3, 1)
    cols = left[:, None, None] + off[None, None, :]  # (I_l, 1, 3)
    inside = (rows <= down[:, None, None]) & (cols <= right[:, None, None])  # (I_l, 3, 3)
    inst_of_pos, dr, dc = inside.nonzero(as_tuple=True)  # sorted by (instance, row, column)
    cell_of_pos = (top[inst_of_pos] + dr) * s + left[inst_of_pos] + dc

    # Owner of each claimed (image, cell): the latest instance claiming it ("later one wins").
    key = img_of[idx][inst_of_pos] * (s * s) + cell_of_pos
    keys, key_of_pos = torch.unique(key, return_inverse=True)
    owner_of_key = torch.full((keys.numel(),), -1, dtype=torch.int64, device=device)
    owner_of_key.scatter_reduce_(0, key_of_pos, idx[inst_of_pos], reduce="amax")
    return inst_of_pos, cell_of_pos, owner_of_key[key_of_pos]


def _extent(any_mask: torch.Tensor) -> torch.Tensor:
    """Length from the first to one past the last True along dim 1; 0 for an all-False row."""
    n, length = any_mask.shape
    pos = torch.arange(length, device=any_mask.device)
    first = torch.where(any_mask, pos, length).amin(dim=1)
    last = torch.where(any_mask, pos, -1).amax(dim=1)
    return (last + 1 - first).clamp(min=0).to(torch.float32)


def _resize_masks(
    masks: torch.Tensor, canvas: Tuple[int, int], size: Tuple[int, int], chunk: int = 32
) -> torch.Tensor:
    """Masks pasted top-left on a zero canvas, resized bilinearly to ``size``, then >= 0.5.

    Args:
        masks: (U, h, w) bool, h <= Hc and w <= Wc.
        canvas: (Hc, Wc).
        size: (H, W) output size.
    Returns:
        (U, H, W) bool.

    When the canvas is an even integer multiple s of the output size (the usual case: strides
    4, 8, 16), bilinear resampling (align_corners=False) samples exactly half-way between input
    pixels s/2 - 1 and s/2 of each block in both directions, so each output is the mean of a 2x2
    pixel block and ">= 0.5" means "at least 2 of those 4 pixels are set": computed exactly from
    four strided slices, without float copies. Otherwise the masks are interpolated as floats.
    """
    (hc, wc), (oh, ow) = canvas, size
    u = masks.shape[0]
    if u == 0:
        return torch.zeros((0, oh, ow), dtype=torch.bool, device=masks.device)
    sh, sw = hc // oh, wc // ow
    if hc == sh * oh and wc == sw * ow and sh % 2 == 0 and sw % 2 == 0:
        u8 = masks.view(torch.uint8)
        count = torch.zeros((u, oh, ow), dtype=torch.uint8, device=masks.device)
        for dy in (0, 1):
            for dx in (0, 1):
                part = u8[:, sh // 2 - 1 + dy :: sh, sw // 2 - 1 + dx :: sw]
                count[:, : part.shape[1], : part.shape[2]] += part
        return count >= 2
    out = []
    for m in masks.split(chunk):
        padded = torch.zeros((m.shape[0], 1, hc, wc), dtype=torch.float32, device=m.device)
        padded[:, 0, : m.shape[1], : m.shape[2]] = m
        out.append(F.interpolate(padded, size=size, mode="bilinear", align_corners=False)[:, 0] >= 0.5)
    return torch.cat(out)
