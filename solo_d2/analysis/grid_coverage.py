"""Grid coverage: which training objects SOLO's grids make positive, and why the others are lost.

The project's own assignment (:func:`solo_d2.modeling.targets.assign_cells`, the rule
:class:`~solo_d2.modeling.targets.SOLOTargetGenerator` applies in training) runs over a dataset's
annotations as the training mapper resizes them, for every train size in ``INPUT.MIN_SIZE_TRAIN``
(with ``MAX_SIZE_TRAIN``), without reading any image: image sizes come from the dataset dicts,
boxes are scaled by the resize, mask centres are computed from the polygons (area-weighted
centroid) or the RLE (decoded at the stored size) and scaled. Each image is treated as alone in
its batch (canvas = its resized size rounded up to the backbone's size divisibility); horizontal
flips and crops are not modelled.

An *object* below is one non-crowd annotation at one train size (a dataset with three train sizes
counts each annotation three times). Crowd annotations are ignored by training and only counted.
A *level* takes the objects whose scale ``sqrt(w * h)`` (box, input pixels) lies in its
``SCALE_RANGES`` entry. Each object falls in exactly one of:

- **assigned**: positive on some cell of some level, and on at least one of those cells the
  category branch sees the object (not cause 3);
- **cause 1 (no level)**: its scale is in no level's range, so it is never a positive sample;
- **cause 2 (cells taken)**: on every level it is on, every cell it would be positive on is
  claimed by a later object of the same image ("the later one wins"), so it is never positive;
- **cause 3 (cell too large)**: it is positive, but on every cell it owns the category branch's
  sample point lies outside the object: the ellipse inscribed in the object's box, centred at
  its mass centre, does not contain the centre of the cell. With ``CATE_ALIGN = "bilinear"`` the
  category feature of a cell is the FPN feature bilinearly sampled at exactly that cell centre,
  so the category target "this object's class" is then learnt from the background beside the
  object: the failure measured in docs/benchmarks/demo.md, "Grids and the category branch" (grids
  ``[8, 6, 5, 4, 3]``: 28% of the objects found got the right class, chance 25%). For a disc the
  ellipse is the object itself, and the criterion is the per-object form of
  ``tests/test_demo.py``'s ``cell * sqrt(2) / 2 < size / 2``. The pooled alignments
  (``adaptive_pool``, ``region_grid``) see the whole cell, but the object still fills only a
  small part of it; the same geometric criterion is reported for them.

Per level: objects on the level, objects positive on it (owning >= 1 cell), those losing every
cell there (cause 2 on that level), those positive only on cells that miss them (cause 3 on that
level) and the positive cells per positive object.
"""
import itertools
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from ..modeling.targets import assign_cells

__all__ = [
    "ObjectGeometry",
    "GridCoverage",
    "object_geometry",
    "grid_coverage",
    "grid_coverage_from_cfg",
    "log_grid_coverage",
    "train_sizes",
    "level_strides",
]

@dataclass
class ObjectGeometry:
    """The non-crowd annotations of a dataset, at the stored image size.

    Attributes:
        image_hw: (N, 2) float64, (height, width) of every image.
        img: (A,) int64, image of each annotation (ascending: annotation order within an image).
        cx, cy: (A,) float64, mass centre of the mask (continuous coordinates: pixel i spans
            [i, i + 1)); the box centre when an annotation has no segmentation.
        bw, bh: (A,) float64, box width and height.
        num_crowd: crowd annotations (not in the arrays).
        num_empty: non-crowd annotations with an empty box or mask (dropped by the mapper; not in
            the arrays).
    """

    image_hw: np.ndarray
    img: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    bw: np.ndarray
    bh: np.ndarray
    num_crowd: int = 0
    num_empty: int = 0

    @property
    def num_objects(self) -> int:
        return int(self.img.size)


def _polygon_centres(polys_per_ann: List[list]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area-weighted centroid (cx, cy) and total area of each annotation's polygons (shoelace,
    vectorised over every vertex of every polygon)."""
    flat, poly_len, poly_ann = [], [], []
    for a, polys in enumerate(polys_per_ann):
        for p in polys:
            if len(p) >= 6 and len(p) % 2 == 0:
                flat.append(p)
                poly_len.append(len(p) // 2)
                poly_ann.append(a)
    n = len(polys_per_ann)
    if not flat:
        return np.zeros(n), np.zeros(n), np.zeros(n)
    total = 2 * sum(poly_len)
    xy = np.fromiter(itertools.chain.from_iterable(flat), dtype=np.float64, count=total).reshape(-1, 2)
    lengths = np.asarray(poly_len)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    nxt = np.arange(len(xy)) + 1
    ends = starts + lengths
    nxt[ends - 1] = starts  # each polygon closes on its first vertex
    x0, y0, x1, y1 = xy[:, 0], xy[:, 1], xy[nxt, 0], xy[nxt, 1]
    cross = x0 * y1 - x1 * y0
    poly_of_vertex = np.repeat(np.arange(len(lengths)), lengths)
    area2 = np.bincount(poly_of_vertex, cross, minlength=len(lengths))  # signed, x2
    sx = np.bincount(poly_of_vertex, (x0 + x1) * cross, minlength=len(lengths))
    sy = np.bincount(poly_of_vertex, (y0 + y1) * cross, minlength=len(lengths))
    safe = np.where(area2 == 0, 1.0, area2)
    pcx, pcy, parea = sx / (3 * safe), sy / (3 * safe), np.abs(area2) / 2
    ann = np.asarray(poly_ann)
    area = np.bincount(ann, parea, minlength=n)
    w = np.where(area == 0, 1.0, area)
    return np.bincount(ann, pcx * parea, minlength=n) / w, np.bincount(ann, pcy * parea, minlength=n) / w, area


def _rle_centre(segm, height, width):
    """(cx, cy, area) of an RLE mask (decoded at its stored size)."""
    from pycocotools import mask as mask_util

    if isinstance(segm.get("counts"), list):
        segm = mask_util.frPyObjects(segm, height, width)
    m = mask_util.decode(segm)
    rows, cols = m.sum(axis=1, dtype=np.float64), m.sum(axis=0, dtype=np.float64)
    area = rows.sum()
    if area == 0:
        return 0.0, 0.0, 0.0
    return float(cols @ (np.arange(m.shape[1]) + 0.5) / area), float(rows @ (np.arange(m.shape[0]) + 0.5) / area), float(area)


def object_geometry(dataset_dicts: Sequence[dict]) -> ObjectGeometry:
    """Geometry of the non-crowd annotations of Detectron2 dataset dicts (``height``, ``width``,
    ``annotations`` with ``bbox``, ``bbox_mode``, optional ``segmentation`` and ``iscrowd``).

    Raises:
        ValueError: naming the image when it has no ``height`` / ``width``.
    """
    hw = np.zeros((len(dataset_dicts), 2), dtype=np.float64)
    img, boxes, segm_kind, polys, rles = [], [], [], [], []
    num_crowd = 0
    for i, d in enumerate(dataset_dicts):
        if "height" not in d or "width" not in d:
            raise ValueError(
                f"{d.get('file_name', '<no file_name>')} (image id {d.get('image_id', '?')}): "
                "the dataset dict has no height / width; grid coverage needs the image sizes"
            )
        hw[i] = (d["height"], d["width"])
        for a in d.get("annotations", ()):
            if a.get("iscrowd", 0):
                num_crowd += 1
                continue
            box = a["bbox"]
            mode = a.get("bbox_mode", BoxMode.XYWH_ABS)
            if mode != BoxMode.XYWH_ABS:
                box = BoxMode.convert(list(box), mode, BoxMode.XYWH_ABS)
            img.append(i)
            boxes.append(box)
            s = a.get("segmentation")
            if isinstance(s, list):
                segm_kind.append(1)
                polys.append(s)
                rles.append(None)
            elif isinstance(s, dict):
                segm_kind.append(2)
                polys.append(())
                rles.append(s)
            else:
                segm_kind.append(0)
                polys.append(())
                rles.append(None)
    img = np.asarray(img, dtype=np.int64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    kind = np.asarray(segm_kind, dtype=np.int64)
    cx = boxes[:, 0] + boxes[:, 2] / 2
    cy = boxes[:, 1] + boxes[:, 3] / 2
    area = boxes[:, 2] * boxes[:, 3]
    if (kind == 1).any():
        pcx, pcy, parea = _polygon_centres(polys)
        sel = kind == 1
        cx[sel], cy[sel], area[sel] = pcx[sel], pcy[sel], parea[sel]
    for k in np.flatnonzero(kind == 2):
        h, w = hw[img[k]]
        cx[k], cy[k], area[k] = _rle_centre(rles[k], int(h), int(w))
    keep = (boxes[:, 2] > 0) & (boxes[:, 3] > 0) & (area > 0)
    return ObjectGeometry(
        image_hw=hw, img=img[keep], cx=cx[keep], cy=cy[keep], bw=boxes[keep, 2],
        bh=boxes[keep, 3], num_crowd=num_crowd, num_empty=int((~keep).sum()),
    )


def train_sizes(cfg) -> List[int]:
    """The shortest-edge sizes the training mapper can choose: ``MIN_SIZE_TRAIN`` for
    ``"choice"`` sampling, its two ends and their mean for ``"range"``."""
    sizes = [int(s) for s in cfg.INPUT.MIN_SIZE_TRAIN]
    if cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range":
        lo, hi = min(sizes), max(sizes)
        return sorted({lo, (lo + hi) // 2, hi})
    return sizes


def level_strides(in_features: Sequence[str]) -> List[int]:
    """Stride of the feature each level's category branch resizes (P2 is resized to P3's size
    and the last level to the one before it, as the head does)."""
    strides = [2 ** int(name.lstrip("p").lstrip("P")) for name in in_features]
    if len(strides) > 1:
        strides[0] = strides[1]
        strides[-1] = strides[-2]
    return strides


@dataclass
class GridCoverage:
    """Result of :func:`grid_coverage` (module docs define every count).

    Per-level lists have one entry per level; ``scales`` holds every object's scale (input
    pixels, one per object, i.e. per annotation and train size) for the histogram.
    """

    num_grids: List[int]
    scale_ranges: List[Tuple[float, float]]
    sizes: List[int]
    num_images: int
    num_objects: int
    num_crowd: int
    num_empty: int
    assigned: int
    cause1: int
    cause2: int
    cause3: int
    on_level: List[int]
    pos_level: List[int]
    cause2_level: List[int]
    cause3_level: List[int]
    cells_level: List[int]
    scales: np.ndarray = field(repr=False)
    canvas_max: int = 0
    #: Scales (input px) of the objects lost by cause 2, one per such object.
    cause2_scales: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def pct(self, n: int) -> float:
        return 100.0 * n / self.num_objects if self.num_objects else 0.0

    @property
    def never_positive(self) -> int:
        """Objects that are never a positive sample (causes 1 and 2)."""
        return self.cause1 + self.cause2

    def table(self) -> str:
        """The summary as a fixed-width text table."""

        def cell(n, of):
            return f"{n:7d} {100.0 * n / of:5.1f}%" if of else f"{n:7d}    - "

        lines = [
            f"Grid coverage of the training objects ({self.num_images} images, "
            f"{self.num_objects} objects = non-crowd annotations x {len(self.sizes)} train size(s) "
            f"{self.sizes}; {self.num_crowd} crowd and {self.num_empty} empty annotations ignored)",
            f"{'level':>5} {'grid':>4} {'scale range':>13} {'cell px':>7} | {'on level':>8} "
            f"{'positive':>14} {'cells taken (2)':>15} {'cell too big (3)':>16} {'cells/obj':>9}",
        ]
        for lv, (s, (lo, hi)) in enumerate(zip(self.num_grids, self.scale_ranges)):
            on = self.on_level[lv]
            cpo = self.cells_level[lv] / self.pos_level[lv] if self.pos_level[lv] else 0.0
            lines.append(
                f"{lv:>5} {s:>4} {f'{lo:g}-{hi:g}':>13} {self.canvas_max / s:7.1f} | {on:8d} "
                f"{cell(self.pos_level[lv], on):>14} {cell(self.cause2_level[lv], on):>15} "
                f"{cell(self.cause3_level[lv], on):>16} {cpo:9.2f}"
            )
        cells = sum(self.cells_level)
        pos = self.num_objects - self.cause1 - self.cause2
        def total(n):
            return f"{n} ({self.pct(n):.1f}%)"

        lines += [
            f"total: assigned {total(self.assigned)}; lost by (1) no level's scale range "
            f"{total(self.cause1)}, (2) cells taken by later objects {total(self.cause2)}, "
            f"(3) cell too large for the object {total(self.cause3)}; positive cells per "
            f"positive object {cells / pos if pos else 0.0:.2f}",
        ]
        if self.num_objects:
            lines.append(
                f"object scales (sqrt of box area, input px): min {self.scales.min():.1f}, "
                f"median {np.median(self.scales):.1f}, max {self.scales.max():.1f}; "
                f"cell px = largest train canvas side ({self.canvas_max}) / grid"
            )
        return "\n".join(lines)

    def warnings(self, threshold: float = 5.0) -> List[str]:
        """One message per loss cause above ``threshold`` percent of the objects."""
        out = []
        causes = (
            (self.cause1, "their scale (sqrt of box area after the train resize) is in no level's "
             "MODEL.SOLO.SCALE_RANGES: widen the first / last range"),
            (self.cause2, "another object of the same image claims every cell they would be "
             "positive on (the later one wins): put them on a finer level too (raise its "
             "MODEL.SOLO.SCALE_RANGES end), or use larger MODEL.SOLO.NUM_GRIDS or a larger input"),
            (self.cause3, "their level's cell is so large that the category branch samples the "
             "background beside them: use larger MODEL.SOLO.NUM_GRIDS or a larger input"),
        )
        for k, (n, why) in enumerate(causes, 1):
            if self.pct(n) > threshold:
                what = "would never be positive" if k < 3 else "are positive only on cells whose category sample misses them"
                out.append(
                    f"{self.pct(n):.1f}% of the training objects ({n} of {self.num_objects}) "
                    f"{what}, cause {k}: {why} (tools/analyze_dataset.py --suggest)"
                )
        return out

    def plot(self, path: str) -> str:
        """Histogram of the object scales with each level's range drawn; a PNG at ``path``
        (matplotlib; a plainer cv2 drawing where matplotlib is not installed)."""
        try:
            import matplotlib
        except ImportError:
            return self._plot_cv2(path)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
        if self.num_objects:
            bins = _log_bins(min(self.scales.min(), min(r[0] for r in self.scale_ranges)), self.scales.max())
            ax.hist(self.scales, bins=bins, color="0.4")
        ax.set_xscale("log")
        ymax = ax.get_ylim()[1]
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for lv, (s, (a, b)) in enumerate(zip(self.num_grids, self.scale_ranges)):
            y = ymax * (0.95 - 0.07 * lv)
            ax.plot([max(a, 0.5), b], [y, y], lw=4, color=colours[lv % len(colours)],
                    label=f"level {lv}: S={s}, {a:g}-{b:g} px")
        ax.set_xlabel("object scale sqrt(w*h) after the train resize (input px, log)")
        ax.set_ylabel("objects")
        ax.set_title(
            f"assigned {self.pct(self.assigned):.1f}%, lost: no level {self.pct(self.cause1):.1f}%, "
            f"cells taken {self.pct(self.cause2):.1f}%, cell too large {self.pct(self.cause3):.1f}%",
            fontsize=9,
        )
        ax.legend(fontsize=7, loc="center right")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path

    def _plot_cv2(self, path: str) -> str:
        import cv2

        w, h, m = 880, 400, 50
        img = np.full((h, w, 3), 255, np.uint8)
        lo = min([r[0] for r in self.scale_ranges] + ([self.scales.min()] if self.num_objects else []))
        hi = max([self.scales.max()] if self.num_objects else [2.0])
        bins = _log_bins(lo, hi)
        counts = np.histogram(self.scales, bins=bins)[0] if self.num_objects else np.zeros(len(bins) - 1)
        x = lambda v: int(m + (w - 2 * m - 260) * (np.log(max(v, bins[0])) - np.log(bins[0])) / (np.log(bins[-1]) - np.log(bins[0])))
        top = max(counts.max(), 1)
        for c, a, b in zip(counts, bins[:-1], bins[1:]):
            cv2.rectangle(img, (x(a), h - m - int((h - 3 * m) * c / top)), (x(b), h - m), (100, 100, 100), -1)
        for lv, (s, (a, b)) in enumerate(zip(self.num_grids, self.scale_ranges)):
            y = m + 12 * lv
            colour = tuple(int(v) for v in np.random.default_rng(lv).integers(0, 200, 3))
            cv2.line(img, (x(a), y), (x(min(b, bins[-1])), y), colour, 4)
            cv2.putText(img, f"level {lv}: S={s}, {a:g}-{b:g}", (w - m - 200, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1)
        cv2.putText(img, "object scale sqrt(w*h), input px (log)", (m, h - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
        cv2.imwrite(path, img)
        return path


def _log_bins(lo, hi, n=60):
    return np.geomspace(max(lo, 0.5), max(hi, 1.0) * 1.2, n)


def grid_coverage(
    geometry: ObjectGeometry,
    num_grids: Sequence[int],
    scale_ranges: Sequence[Sequence[float]],
    sizes: Sequence[int],
    max_size: int,
    sigma: float = 0.2,
    size_divisibility: int = 32,
) -> GridCoverage:
    """Count assigned and lost objects (module docs) for grids ``num_grids`` and ranges
    ``scale_ranges`` when images are resized to shortest edge ``sizes`` (each) capped at
    ``max_size``, the canvas rounded up to ``size_divisibility``."""
    num_levels = len(num_grids)
    if len(scale_ranges) != num_levels:
        raise ValueError(f"{len(num_grids)} grids but {len(scale_ranges)} scale ranges")
    n_img, div = len(geometry.image_hw), max(int(size_divisibility), 1)
    a = geometry.num_objects
    counts = dict(assigned=0, cause1=0, cause2=0, cause3=0)
    on_l, pos_l, c2_l, c3_l, cells_l = ([0] * num_levels for _ in range(5))
    scales_all, lost2_all, canvas_max = [], [], 0
    img = torch.from_numpy(geometry.img)
    for size in sizes:
        # The mapper's resize (ResizeShortestEdge's rounding), per image.
        h, w = geometry.image_hw[:, 0], geometry.image_hw[:, 1]
        nh, nw = np.zeros_like(h), np.zeros_like(w)
        uniq, inv = np.unique(geometry.image_hw, axis=0, return_inverse=True)
        for u, (uh, uw) in enumerate(uniq):
            sel = inv.reshape(-1) == u
            nh[sel], nw[sel] = T.ResizeShortestEdge.get_output_shape(int(uh), int(uw), size, max_size)
        ch, cw = np.ceil(nh / div) * div, np.ceil(nw / div) * div
        if n_img:
            canvas_max = max(canvas_max, int(max(ch.max(), cw.max())))
        sy, sx = (nh / np.where(h == 0, 1, h))[geometry.img], (nw / np.where(w == 0, 1, w))[geometry.img]
        bw = torch.from_numpy(geometry.bw * sx).float()
        bh = torch.from_numpy(geometry.bh * sy).float()
        # Mass centre in the target generator's pixel-index coordinates.
        cx = torch.from_numpy(geometry.cx * sx - 0.5).float()
        cy = torch.from_numpy(geometry.cy * sy - 0.5).float()
        hc = torch.from_numpy(ch[geometry.img]).float()
        wc = torch.from_numpy(cw[geometry.img]).float()
        obj_scale = (bw * bh).sqrt()
        scales_all.append(obj_scale.numpy())
        on_any = torch.zeros(a, dtype=torch.bool)
        pos_any = torch.zeros(a, dtype=torch.bool)
        hit_any = torch.zeros(a, dtype=torch.bool)
        for lv, (s, (lo, hi)) in enumerate(zip(num_grids, scale_ranges)):
            s = int(s)
            on = (obj_scale >= lo) & (obj_scale <= hi)
            on_any |= on
            idx = on.nonzero().squeeze(1)
            inst_of_pos, cell, owner_of_pos = assign_cells(s, sigma, (hc, wc), idx, img, cx, cy, bw, bh)
            inst = idx[inst_of_pos]
            won = owner_of_pos == inst
            inst, cell = inst[won], cell[won]
            owned = torch.bincount(inst, minlength=a)
            # Category sample point of each owned cell: the cell centre (continuous coords).
            py = (torch.div(cell, s, rounding_mode="floor").float() + 0.5) * hc[inst] / s
            px = ((cell % s).float() + 0.5) * wc[inst] / s
            dy = (py - (cy[inst] + 0.5)) / (bh[inst] / 2)
            dx = (px - (cx[inst] + 0.5)) / (bw[inst] / 2)
            hit = torch.zeros(a, dtype=torch.bool)
            hit[inst[dx * dx + dy * dy < 1]] = True
            pos = owned > 0
            pos_any |= pos
            hit_any |= hit
            on_l[lv] += int(on.sum())
            pos_l[lv] += int(pos.sum())
            c2_l[lv] += int((on & ~pos).sum())
            c3_l[lv] += int((pos & ~hit).sum())
            cells_l[lv] += int(owned.sum())
        counts["cause1"] += int((~on_any).sum())
        counts["cause2"] += int((on_any & ~pos_any).sum())
        lost2_all.append(obj_scale[on_any & ~pos_any].numpy())
        counts["cause3"] += int((pos_any & ~hit_any).sum())
        counts["assigned"] += int((pos_any & hit_any).sum())
    return GridCoverage(
        num_grids=[int(s) for s in num_grids],
        scale_ranges=[(float(lo), float(hi)) for lo, hi in scale_ranges],
        sizes=[int(s) for s in sizes],
        num_images=n_img,
        num_objects=a * len(sizes),
        num_crowd=geometry.num_crowd,
        num_empty=geometry.num_empty,
        on_level=on_l,
        pos_level=pos_l,
        cause2_level=c2_l,
        cause3_level=c3_l,
        cells_level=cells_l,
        scales=np.concatenate(scales_all) if scales_all else np.zeros(0),
        canvas_max=canvas_max,
        cause2_scales=np.concatenate(lost2_all) if lost2_all else np.zeros(0),
        **counts,
    )


def grid_coverage_from_cfg(cfg, geometry: ObjectGeometry, size_divisibility: int = 32) -> GridCoverage:
    """:func:`grid_coverage` with the grids, ranges, sigma and train sizes of ``cfg``."""
    sc = cfg.MODEL.SOLO
    return grid_coverage(
        geometry, sc.NUM_GRIDS, sc.SCALE_RANGES, train_sizes(cfg), cfg.INPUT.MAX_SIZE_TRAIN,
        sigma=sc.SIGMA, size_divisibility=size_divisibility,
    )


def log_grid_coverage(cfg, dataset_dicts: Sequence[dict], logger, threshold: float = 5.0):
    """Log the grid coverage of a SOLO config's training data (one table, INFO) and a WARNING
    for each loss cause above ``threshold`` percent of the objects; returns the
    :class:`GridCoverage`, or None for a model that is not SOLO (no grids) or dataset dicts
    without image sizes (logged)."""
    if cfg.MODEL.META_ARCHITECTURE != "SOLO":
        return None
    import time

    t0 = time.perf_counter()
    try:
        cov = grid_coverage_from_cfg(cfg, object_geometry(dataset_dicts))
    except ValueError as e:
        logger.warning(f"grid coverage of the training data not computed: {e}")
        return None
    logger.info(f"{cov.table()}\n(computed in {time.perf_counter() - t0:.2f} s; tools/analyze_dataset.py draws the histogram and suggests grids)")
    for w in cov.warnings(threshold):
        logger.warning(w)
    return cov
