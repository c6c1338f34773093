"""Grid suggestion: grid numbers, scale ranges and (where it helps) an input size for a dataset,
chosen so that :mod:`.grid_coverage` loses < 1% of the objects by causes 1 and 2 and few by
cause 3, each choice with the reason for it.

The rules, in order:

1. **Scale ranges** (cause 1): the config's ranges, with the first range's lower end lowered to
   the smallest object scale and the last range's upper end raised to the largest, and any gap
   between neighbouring ranges closed. Ranges are not scaled with the data: they are tied to the
   mask strides (an object must span several mask pixels of its level), not to the image size.
2. **Grid numbers** (cause 3): on level l, a cell is at most ``q_l / sqrt(2)`` pixels wide, where
   ``q_l`` is the 2nd percentile of the scales of the level's objects: an object's centre lies at
   most half a cell from the centre of its cell in x and in y, so the cell centre is then inside
   the disc of diameter ``q_l`` around it. ``S_l = ceil(sqrt(2) * canvas / q_l)`` with ``canvas``
   the largest train canvas side; never below the config's grid.
3. **Cap**: a cell is never smaller than half a pixel of the level's category feature
   (``S_l <= 2 * canvas / stride_l``); where rule 2 needs more, the input size is scaled up
   instead (objects grow with the input, the cap with the canvas).
4. **Collisions** (cause 2), then cause 3 again: while causes 1 + 2 lose >= 1% or cause 3 > 2%:
   first, while cause 2 loses >= 1%, the objects it loses are also put on the next finer level
   (that level's range end is raised to their largest scale; :func:`_put_on_finer_level`): a
   finer level tells apart the objects whose centres share a cell of a coarser one without
   adding grid cells, which cost training time (docs/benchmarks/fit_your_data.md). Then
   the level losing most objects gets a 25% larger grid (or, at its cap, the input grows 25%).

A suggestion that does not reduce the objects lost (causes 1 + 2 + 3 together) is not made:
the config's settings are returned with ``improved`` False and a reason saying why (e.g. objects
with the centre and box of another object of their image, duplicated annotations, which no grid
tells apart).

Where a grid ends finer than its level's category feature, a ``cost:`` line says so before the
result: such a grid trains slower, and whether the objects it keeps are worth that depends on
how many they are (measured in docs/benchmarks/fit_your_data.md).
"""
import ast
import math
import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import yaml

from .grid_coverage import GridCoverage, ObjectGeometry, grid_coverage, level_strides, train_sizes

__all__ = ["GridSuggestion", "suggest_grids"]

#: Targets of the suggestion, in percent of the objects.
MAX_NEVER_POSITIVE_PCT = 1.0
MAX_CELL_TOO_LARGE_PCT = 2.0
#: Percentile of a level's object scales that its cells are sized for.
SMALL_OBJECT_PERCENTILE = 2.0


@dataclass
class GridSuggestion:
    """The suggested settings, why each was chosen, and their coverage."""

    num_grids: List[int]
    scale_ranges: List[Tuple[float, float]]
    input_scale: float
    min_size_train: List[int]
    max_size_train: int
    min_size_test: int
    max_size_test: int
    reasons: List[str]
    coverage: GridCoverage
    before: GridCoverage
    changed_input: bool = False
    #: Whether the suggestion loses fewer objects than the config (else it is the config's own
    #: settings, and ``reasons`` says why nothing better was found).
    improved: bool = True

    def settings(self, input_sizes: bool = True) -> List[Tuple[str, object]]:
        """The suggested ``(config key, value)`` pairs: grids and ranges, then (if ``input_sizes``)
        the input sizes."""
        pairs: List[Tuple[str, object]] = [
            ("MODEL.SOLO.NUM_GRIDS", list(self.num_grids)),
            ("MODEL.SOLO.SCALE_RANGES", [[_num(lo), _num(hi)] for lo, hi in self.scale_ranges]),
        ]
        if input_sizes:
            pairs += [
                ("INPUT.MIN_SIZE_TRAIN", list(self.min_size_train)),
                ("INPUT.MAX_SIZE_TRAIN", self.max_size_train),
                ("INPUT.MIN_SIZE_TEST", self.min_size_test),
                ("INPUT.MAX_SIZE_TEST", self.max_size_test),
            ]
        return pairs

    @property
    def opts(self) -> List[str]:
        """The changes as ``KEY VALUE`` command-line options: grids and ranges, and the input sizes
        if the suggestion changed them."""
        out: List[str] = []
        for key, value in self.settings(input_sizes=self.changed_input):
            out += [key, f"({', '.join(map(str, value))},)" if key == "INPUT.MIN_SIZE_TRAIN" else str(value)]
        return out

    def yaml(self, base_config: str, out_path: str, opts: Sequence[str] = ()) -> str:
        """A config whose ``_BASE_`` is ``base_config`` (relative to ``out_path``'s folder).

        It holds the suggested grids and ranges, the input sizes the analysis used (always: the
        ranges fit objects at those sizes) and ``opts``, the ``KEY VALUE`` options the analysis
        was given on top of ``base_config`` (values parsed as Detectron2 parses them), so that
        training with it sees the config the analysis saw.
        """
        base = os.path.relpath(os.path.abspath(base_config), os.path.dirname(os.path.abspath(out_path)))
        tree: dict = {"_BASE_": base}
        if len(opts) % 2:
            raise ValueError(f"options must be KEY VALUE pairs, got an odd number: {list(opts)}")
        for key, value in zip(opts[0::2], opts[1::2]):
            _put(tree, key, _plain(_parse(value)))
        for key, value in self.settings(input_sizes=True):
            _put(tree, key, value)
        head = ["# Written by tools/analyze_dataset.py --suggest. Why each number:", *(f"#   {r}" for r in self.reasons)]
        return "\n".join(head) + "\n" + yaml.safe_dump(tree, default_flow_style=None, sort_keys=False, width=1000)


def _put(tree: dict, key: str, value) -> None:
    """Set ``tree[A][B][C] = value`` for ``key = "A.B.C"``."""
    *path, last = key.split(".")
    for part in path:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _parse(value):
    """A command-line option value as Detectron2's config parses it (a Python literal, else a string)."""
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _plain(value):
    """Tuples as lists (YAML's safe dumper writes lists, the config reads them back as tuples)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _num(v):
    return int(v) if float(v).is_integer() else round(float(v), 2)


def _round32(v):
    return max(32, int(round(v / 32.0)) * 32)


def suggest_grids(cfg, geometry: ObjectGeometry, size_divisibility: int = 32, max_rounds: int = 16) -> GridSuggestion:
    """Suggest grids, ranges and input size for ``geometry`` starting from ``cfg`` (module docs)."""
    sc = cfg.MODEL.SOLO
    sizes0 = train_sizes(cfg)
    max0 = int(cfg.INPUT.MAX_SIZE_TRAIN)
    strides = level_strides(sc.IN_FEATURES)
    grids = [int(s) for s in sc.NUM_GRIDS]
    ranges = [[float(lo), float(hi)] for lo, hi in sc.SCALE_RANGES]
    reasons: List[str] = []
    factor = 1.0

    def cover(grids, ranges, factor):
        sizes = [_round32(s * factor) if factor != 1.0 else s for s in sizes0]
        mx = _round32(max0 * factor) if factor != 1.0 else max0
        return grid_coverage(geometry, grids, ranges, sizes, mx, sigma=sc.SIGMA, size_divisibility=size_divisibility)

    before = cover(grids, ranges, 1.0)
    if geometry.num_objects == 0:
        reasons.append("the dataset has no (non-crowd) objects: the config is kept as it is")
        return _result(cfg, grids, ranges, 1.0, reasons, before, before)

    # 1. Scale ranges cover every object scale at every train size (and at any input scale-up
    #    below: the range ends are widened once more after the rounds).
    def widen(cov):
        lo_obj, hi_obj = float(cov.scales.min()), float(cov.scales.max())
        if lo_obj < ranges[0][0]:
            new = math.floor(lo_obj * 10) / 10
            reasons.append(f"level 0 range starts at {_num(new)} (was {_num(ranges[0][0])}): the smallest object scale is {lo_obj:.1f} px (cause 1)")
            ranges[0][0] = new
        if hi_obj > ranges[-1][1]:
            new = float(math.ceil(hi_obj * 1.1))
            reasons.append(f"level {len(ranges) - 1} range ends at {_num(new)} (was {_num(ranges[-1][1])}): the largest object scale is {hi_obj:.1f} px (cause 1)")
            ranges[-1][1] = new
        for lv in range(1, len(ranges)):
            if ranges[lv][0] > ranges[lv - 1][1]:
                reasons.append(f"level {lv} range starts at {_num(ranges[lv - 1][1])} (was {_num(ranges[lv][0])}): no gap between levels (cause 1)")
                ranges[lv][0] = ranges[lv - 1][1]

    widen(before)

    # 2-3. Grid numbers from each level's small objects; input scale-up where the cap binds.
    def size_grids(cov, factor, say=True):
        canvas = cov.canvas_max
        need_factor = 1.0
        for lv, (lo, hi) in enumerate(ranges):
            on = cov.scales[(cov.scales >= lo) & (cov.scales <= hi)]
            if on.size == 0:
                continue
            q = max(float(np.percentile(on, SMALL_OBJECT_PERCENTILE)), 1.0)
            need = math.ceil(math.sqrt(2) * canvas / q)
            cap = int(2 * canvas // strides[lv])
            if need > grids[lv]:
                new = min(need, cap)
                if say:
                    reasons.append(
                        f"level {lv}: grid {grids[lv]} -> {new}: {SMALL_OBJECT_PERCENTILE:g}% of its objects are smaller than "
                        f"{q:.1f} px; cells of at most {q / math.sqrt(2):.1f} px ({canvas} px canvas / {need}) keep the "
                        f"cell centre inside them (cause 3)" + (f"; capped at {cap} = half a stride-{strides[lv]} feature pixel" if need > cap else "")
                    )
                grids[lv] = new
            if need > cap:
                need_factor = max(need_factor, math.sqrt(need / cap))
        return need_factor

    need_factor = size_grids(before, factor)
    if need_factor > 1.05:
        factor = min(math.ceil(need_factor * 4) / 4, 4.0)
        reasons.append(
            f"input x{factor:g} (MIN_SIZE_TRAIN {[_round32(s * factor) for s in sizes0]}): level grids hit their cap "
            "(cells of half a feature pixel); a larger input makes the objects larger relative to the cells"
        )
        size_grids(cover(grids, ranges, factor), factor)

    # 4. Rounds against collisions (cause 2) and the remaining cause 3.
    cov = cover(grids, ranges, factor)
    widen(cov)
    for _ in range(max_rounds):
        cov = cover(grids, ranges, factor)
        if cov.pct(cov.cause1 + cov.cause2) < MAX_NEVER_POSITIVE_PCT and cov.pct(cov.cause3) <= MAX_CELL_TOO_LARGE_PCT:
            break
        lost = [c2 + c3 for c2, c3 in zip(cov.cause2_level, cov.cause3_level)]
        lv = int(np.argmax(lost))
        cap = int(2 * cov.canvas_max // strides[lv])
        if cov.cause1 and cov.pct(cov.cause1) >= MAX_NEVER_POSITIVE_PCT:
            widen(cov)
            continue
        if cov.pct(cov.cause2) >= MAX_NEVER_POSITIVE_PCT and _put_on_finer_level(cov, grids, ranges, reasons):
            continue
        if grids[lv] < cap:
            new = min(cap, math.ceil(grids[lv] * 1.25))
            reasons.append(
                f"level {lv}: grid {grids[lv]} -> {new}: it lost {lost[lv]} objects to cells taken by later "
                f"objects (cause 2: {cov.cause2_level[lv]}) or too large (cause 3: {cov.cause3_level[lv]})"
            )
            grids[lv] = new
        else:
            factor *= 1.25
            reasons.append(
                f"input x{factor:g}: level {lv} (grid {grids[lv]}, at its cap) still lost {lost[lv]} objects "
                "(causes 2 and 3); a larger input spreads the objects over more cells"
            )
            widen(cover(grids, ranges, factor))
    cov = cover(grids, ranges, factor)
    lost_before = before.cause1 + before.cause2 + before.cause3
    lost_after = cov.cause1 + cov.cause2 + cov.cause3
    if reasons and lost_before and lost_after >= lost_before:
        config_grids = [int(s) for s in sc.NUM_GRIDS]
        config_ranges = [[float(lo), float(hi)] for lo, hi in sc.SCALE_RANGES]
        why = [
            f"no suggestion: the best settings found (grids {grids}, input x{factor:g}) lose "
            f"{cov.pct(lost_after):.2f}% of the objects (causes 1 + 2 + 3), the config "
            f"{before.pct(lost_before):.2f}%: they do not reduce the losses, so the config is kept"
        ]
        twins = _coincident_objects(geometry)
        if twins:
            why.append(
                f"{twins} objects have the centre and box of another object of their image "
                "(duplicated annotations?): no grid or input size tells them apart; remove the copies")
        return _result(cfg, config_grids, config_ranges, 1.0, why, before, before, improved=False)
    if not reasons:
        reasons.append("the config already keeps the objects: nothing changed")
    reasons += _finer_than_feature_notes(grids, [int(s) for s in sc.NUM_GRIDS], strides, cov.canvas_max)
    reasons.append(
        f"result: lost by cause 1 {cov.pct(cov.cause1):.2f}%, cause 2 {cov.pct(cov.cause2):.2f}%, "
        f"cause 3 {cov.pct(cov.cause3):.2f}% (config: {before.pct(before.cause1):.2f}%, "
        f"{before.pct(before.cause2):.2f}%, {before.pct(before.cause3):.2f}%)"
    )
    return _result(cfg, grids, ranges, factor, reasons, cov, before)


def _coincident_objects(geometry: ObjectGeometry) -> int:
    """Objects whose image, mask centre and box size equal those of an earlier object."""
    rows = np.stack([geometry.img.astype(np.float64), geometry.cx, geometry.cy, geometry.bw, geometry.bh], axis=1)
    return int(len(rows) - len(np.unique(np.round(rows, 3), axis=0)))


def _put_on_finer_level(cov: GridCoverage, grids, ranges, reasons) -> bool:
    """Rule 4's first resort against cause 2: also put the lost objects on the next finer level.

    Each object lost by cause 2 has a finest level ``f`` among those it is on; the ``f`` holding
    most of them (``f > 0``) gets its finer neighbour ``f - 1`` to take them too, by raising that
    level's range end to the largest of their scales. Level ``f - 1`` has more, smaller cells
    (stride and grid are finer), so objects whose centres share a cell of level ``f`` fall in
    different cells there. Unlike a larger grid this adds no category cells (the category loss
    and the head stay as they are); it adds positive cells per object. Returns False (ranges
    unchanged) when no lost object can be moved: all are on level 0 already, or below the start
    of the finer level's range.
    """
    lost = cov.cause2_scales
    finest = np.full(lost.shape, -1)
    for lv in reversed(range(len(ranges))):
        lo, hi = ranges[lv]
        finest[(lost >= lo) & (lost <= hi)] = lv
    # Only objects that level f - 1 can take by raising its range end (not below its start).
    lower_start = np.array([lo for lo, _ in ranges] + [0.0])[finest - 1]
    movable = (finest > 0) & (lost >= lower_start)
    counts = np.bincount(finest[movable], minlength=len(ranges))
    if counts.sum() == 0:
        return False
    f = int(np.argmax(counts))
    these = lost[movable & (finest == f)]
    new_hi = float(math.ceil(these.max()))
    old_hi = ranges[f - 1][1]
    ranges[f - 1][1] = new_hi
    reasons.append(
        f"level {f - 1} range ends at {_num(new_hi)} (was {_num(old_hi)}): {counts[f]} objects of "
        f"{these.min():.0f}-{these.max():.0f} px lost to cells taken by later objects on level {f}"
        + (" and the coarser ones" if f < len(ranges) - 1 else "")
        + f" (cause 2) are also put on level {f - 1}, whose {cov.canvas_max / grids[f - 1]:.1f} px cells tell them "
        "apart; this adds no grid cells"
    )
    return True


def _finer_than_feature_notes(grids, config_grids, strides, canvas) -> List[str]:
    """The cost of the grids that rule 3 lets exceed their level's category feature.

    A grid of more cells than the level's feature has pixels across the canvas reads
    interpolations of one feature pixel in neighbouring cells, and the category loss covers
    ``(S / S_config)**2`` times the cells, nearly all negatives: it trains slower. Whether the
    objects kept are worth it depends on how many they are (measured in
    docs/benchmarks/fit_your_data.md).
    """
    notes = []
    for lv, (s, s0) in enumerate(zip(grids, config_grids)):
        pixels = canvas // strides[lv]
        if s > s0 and s > pixels:
            notes.append(
                f"cost: level {lv}'s grid {s} is finer than its category feature ({pixels} stride-{strides[lv]} pixels "
                f"across the {canvas} px canvas) and has {(s / s0) ** 2:.0f}x the cells of grid {s0}: it trains slower; "
                "worth it when it keeps many objects (compare both configs at equal training time)"
            )
    return notes


def _result(cfg, grids, ranges, factor, reasons, cov, before, improved=True) -> GridSuggestion:
    changed = factor != 1.0
    if changed:
        train = [_round32(s * factor) for s in cfg.INPUT.MIN_SIZE_TRAIN]
        max_train = _round32(cfg.INPUT.MAX_SIZE_TRAIN * factor)
        min_test = _round32(cfg.INPUT.MIN_SIZE_TEST * factor)
        max_test = _round32(cfg.INPUT.MAX_SIZE_TEST * factor)
    else:
        train, max_train = list(cfg.INPUT.MIN_SIZE_TRAIN), int(cfg.INPUT.MAX_SIZE_TRAIN)
        min_test, max_test = int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST)
    return GridSuggestion(
        num_grids=list(grids), scale_ranges=[(lo, hi) for lo, hi in ranges], input_scale=factor,
        min_size_train=train, max_size_train=max_train, min_size_test=min_test, max_size_test=max_test,
        reasons=reasons, coverage=cov, before=before, changed_input=changed, improved=improved,
    )
