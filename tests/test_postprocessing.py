"""Point NMS, Matrix NMS and the per-image output contract."""
import math

import pytest
import torch
from detectron2.structures import BitMasks

from solo_d2.modeling import SOLOPostProcessor, matrix_nms, point_nms
from solo_d2.modeling.layers import masks_to_boxes


def test_point_nms_keeps_local_maxima_of_2x2():
    p = torch.tensor([[[0.1, 0.9, 0.2], [0.3, 0.4, 0.8], [0.5, 0.1, 0.1]]])
    kept = point_nms(p)
    # Each cell is compared with itself and its up/left/up-left neighbours (2x2 max pool).
    expected = torch.tensor([[[0.1, 0.9, 0.0], [0.3, 0.0, 0.0], [0.5, 0.0, 0.0]]])
    assert torch.equal(kept, expected)


def _square(y0, x0, size=8, hw=32):
    m = torch.zeros(hw, hw, dtype=torch.bool)
    m[y0 : y0 + size, x0 : x0 + size] = True
    return m


def test_matrix_nms_decays_duplicate_keeps_distinct():
    masks = torch.stack([_square(0, 0), _square(0, 0), _square(16, 16), _square(0, 0)])
    labels = torch.tensor([1, 1, 1, 2])  # a duplicate, a distinct mask, another class
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    out = matrix_nms(masks, labels, scores, "gaussian", sigma=2.0)
    assert math.isclose(out[0].item(), 0.9, rel_tol=1e-6)
    assert math.isclose(out[1].item(), 0.8 * math.exp(-2.0), rel_tol=1e-5)
    assert math.isclose(out[2].item(), 0.7, rel_tol=1e-6)
    assert math.isclose(out[3].item(), 0.6, rel_tol=1e-6)
    lin = matrix_nms(masks, labels, scores, "linear")
    assert lin[1].item() == pytest.approx(0.0, abs=1e-6) and lin[2].item() == pytest.approx(0.7)


def test_matrix_nms_compensation():
    # A overlaps B (IoU 0.5), B overlaps C (IoU 0.5), A and C do not overlap. C's decay by B is
    # compensated because B was itself suppressed by A: exp(-2*0.25) / exp(-2*0.25) = 1.
    a = torch.zeros(4, 4, dtype=torch.bool); a[:, 0:2] = True
    b = torch.zeros(4, 4, dtype=torch.bool); b[:, 1:3] = True
    c = torch.zeros(4, 4, dtype=torch.bool); c[:, 2:4] = True
    iou = 1 / 3  # two columns each, one shared
    out = matrix_nms(torch.stack([a, b, c]), torch.zeros(3, dtype=torch.long), torch.tensor([0.9, 0.8, 0.7]))
    assert out[1].item() == pytest.approx(0.8 * math.exp(-2 * iou**2), rel=1e-5)
    assert out[2].item() == pytest.approx(0.7, rel=1e-5)


def test_masks_to_boxes_matches_detectron2():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 20, 30, generator=g) > 0.97
    masks[0] = False
    ours = masks_to_boxes(masks)
    theirs = BitMasks(masks).get_bounding_boxes().tensor
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs)


def _postprocessor(**kw):
    return SOLOPostProcessor(num_classes=3, num_grids=[4, 2], min_areas=[8, 16], **kw)


def test_output_contract_and_requested_size():
    # Level 0 (4x4 grid): cell 5 (row 1, col 1), class 2, score ~0.95, mask = a square.
    cate = [torch.full((3, 4, 4), -10.0), torch.full((3, 2, 2), -10.0)]
    cate[0][2, 1, 1] = 3.0
    mask = torch.zeros(16, 16)
    mask[4:12, 2:10] = 0.9

    def mask_fn(level, cells):
        return mask.expand(len(cells), 16, 16).clone()

    out = _postprocessor()(cate, mask_fn, (16, 16), (64, 64), (60, 50), (120, 100))
    assert out.image_size == (120, 100)
    assert len(out) == 1
    assert out.pred_masks.shape == (1, 120, 100) and out.pred_masks.dtype == torch.bool
    assert out.scores.dtype == torch.float32 and out.pred_classes.dtype == torch.int64
    assert out.pred_classes.tolist() == [2]
    # score = sigmoid(3) * maskness (0.9)
    assert out.scores.item() == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item() * 0.9, rel=1e-5)
    # Mask: stride-4 square rows 4..11, cols 2..9 -> input rows 16..47, cols 8..39, then x2.
    ys, xs = out.pred_masks[0].nonzero(as_tuple=True)
    assert 30 <= ys.min() <= 34 and 94 <= ys.max() <= 97
    assert 14 <= xs.min() <= 18 and 78 <= xs.max() <= 81
    assert torch.equal(out.pred_boxes.tensor, masks_to_boxes(out.pred_masks))


def test_empty_output_keeps_shapes_and_dtypes():
    cate = [torch.full((3, 4, 4), -10.0), torch.full((3, 2, 2), -10.0)]
    out = _postprocessor()(cate, lambda lv, c: torch.zeros(len(c), 16, 16), (16, 16), (64, 64), (64, 64), (30, 40))
    assert len(out) == 0 and out.image_size == (30, 40)
    assert out.pred_masks.shape == (0, 30, 40) and out.pred_masks.dtype == torch.bool
    assert out.scores.shape == (0,) and out.scores.dtype == torch.float32
    assert out.pred_classes.shape == (0,) and out.pred_classes.dtype == torch.int64
    assert out.pred_boxes.tensor.shape == (0, 4)


def test_small_masks_dropped_and_max_per_image():
    cate = [torch.full((3, 4, 4), 5.0), torch.full((3, 2, 2), -10.0)]
    cate[0][:, 1::2, :] = -10.0  # point NMS keeps every other row's cells anyway
    tiny = torch.zeros(16, 16)
    tiny[0, 0:8] = 1.0  # area 8 <= stride 8 on level 0: dropped
    out = _postprocessor()(cate, lambda lv, c: tiny.expand(len(c), 16, 16).clone(), (16, 16), (64, 64), (64, 64), (64, 64))
    assert len(out) == 0

    g = torch.Generator().manual_seed(0)
    many = (torch.rand(16, 16, 16, generator=g) > 0.5).float()
    pp = _postprocessor(max_per_image=5)
    cate = [torch.rand(3, 4, 4, generator=g) * 4, torch.full((3, 2, 2), -10.0)]
    out = pp(cate, lambda lv, c: many[c], (16, 16), (64, 64), (64, 64), (64, 64))
    assert len(out) == 5 and (out.scores[:-1] >= out.scores[1:]).all()


def _four_candidates():
    """Four level-0 candidates (distinct cells, non-overlapping masks), hand-computed:

    cell (class, logit, mask area x value) -> category score, rescored score
    0  (0, 3.0, 64 x 0.60) -> 0.9526, 0.5716
    2  (1, 2.0, 64 x 0.95) -> 0.8808, 0.8368
    8  (2, 1.0, 64 x 1.00) -> 0.7311, 0.7311
    10 (1, 4.0,  4 x 1.00) -> 0.9820, dropped by the area filter (4 <= stride 8)
    """
    cate = [torch.full((3, 4, 4), -10.0), torch.full((3, 2, 2), -10.0)]
    masks = {}
    for cell, cls, logit, (r, c), size, value in [
        (0, 0, 3.0, (0, 0), 8, 0.60), (2, 1, 2.0, (0, 8), 8, 0.95),
        (8, 2, 1.0, (8, 0), 8, 1.00), (10, 1, 4.0, (8, 8), 2, 1.00),
    ]:
        cate[0][cls, cell // 4, cell % 4] = logit
        m = torch.zeros(16, 16)
        m[r : r + size, c : c + size] = value
        masks[cell] = m

    def mask_fn(level, cells):  # called once per level, with that level's cells (maybe none)
        return torch.stack([masks[int(c)] for c in cells] + [torch.zeros(16, 16)])[:-1]

    return cate, mask_fn


def test_nms_pre_is_applied_after_area_filter_and_maskness_as_the_reference():
    cate, mask_fn = _four_candidates()
    out = _postprocessor(nms_pre=2)(cate, mask_fn, (16, 16), (64, 64), (64, 64), (64, 64))
    # The two best *rescored* candidates that pass the area filter: cells 2 and 8.
    assert out.pred_classes.tolist() == [1, 2]
    sig = torch.sigmoid(torch.tensor([2.0, 1.0]))
    assert torch.allclose(out.scores, sig * torch.tensor([0.95, 1.0]), rtol=1e-5)
    # Without a cap all three survivors come out, best rescored first.
    out = _postprocessor(nms_pre=500)(cate, mask_fn, (16, 16), (64, 64), (64, 64), (64, 64))
    assert out.pred_classes.tolist() == [1, 2, 0]


def test_nms_pre_before_masks_takes_the_top_category_scores_first():
    # Opt-in (MODEL.SOLO.NMS_PRE_BEFORE_MASKS): the top 2 by category score are cells 10 and 0;
    # cell 10 then fails the area filter, so one detection is left.
    cate, mask_fn = _four_candidates()
    formed = []

    def spy(level, cells):
        formed.extend(cells.tolist())
        return mask_fn(level, cells)

    out = _postprocessor(nms_pre=2, nms_pre_before_masks=True)(cate, spy, (16, 16), (64, 64), (64, 64), (64, 64))
    assert sorted(formed) == [0, 10]  # only nms_pre masks are formed
    assert out.pred_classes.tolist() == [0]
    assert out.scores.item() == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item() * 0.6, rel=1e-5)


def test_masks_of_another_size_are_resized_to_the_finest():
    # A mask_fn returning a coarser level's size (8x8) is resized bilinearly to mask_size.
    cate = [torch.full((3, 4, 4), -10.0), torch.full((3, 2, 2), -10.0)]
    cate[1][0, 0, 0] = 3.0
    coarse = torch.zeros(8, 8)
    coarse[0:4, 0:4] = 1.0
    out = _postprocessor()(cate, lambda lv, c: coarse.expand(len(c), 8, 8).clone(), (16, 16), (64, 64), (64, 64), (64, 64))
    assert len(out) == 1
    expected = torch.nn.functional.interpolate(coarse[None, None], size=(16, 16), mode="bilinear")[0, 0]
    expected = torch.nn.functional.interpolate(expected[None, None], size=(64, 64), mode="bilinear")[0, 0] > 0.5
    assert torch.equal(out.pred_masks[0], expected)


def test_many_candidates_are_rescored_in_chunks_with_the_same_result(monkeypatch):
    # More candidates than nms_pre: they are rescored a chunk at a time (never more than a chunk
    # of masks formed at once), then only the nms_pre kept are formed again; the result equals
    # rescoring all of them at once.
    g = torch.Generator().manual_seed(0)
    cate = [torch.randn(3, 6, 6, generator=g) * 2, torch.randn(3, 4, 4, generator=g) * 2]
    feats = [torch.randn(36, 16, 16, generator=g) * 3, torch.randn(16, 8, 8, generator=g) * 3]
    calls = []

    def mask_fn(level, cells):
        calls.append(len(cells))
        return feats[level][cells].sigmoid()

    pp = _postprocessor(nms_pre=20, score_thresh=0.05, update_thresh=0.0, max_per_image=50)
    monkeypatch.setattr(SOLOPostProcessor, "RESCORE_CHUNK", 1000)  # all at once
    whole = pp(cate, mask_fn, (16, 16), (64, 64), (64, 64), (64, 64))
    assert max(calls) > 20  # more candidates than nms_pre on a level: the chunked path below
    calls.clear()
    monkeypatch.setattr(SOLOPostProcessor, "RESCORE_CHUNK", 7)
    chunked = pp(cate, mask_fn, (16, 16), (64, 64), (64, 64), (64, 64))
    assert max(calls) <= 20 and len(chunked) > 0
    assert torch.equal(chunked.pred_classes, whole.pred_classes)
    assert torch.equal(chunked.scores, whole.scores)
    assert torch.equal(chunked.pred_masks, whole.pred_masks)


def _exporting(monkeypatch, value):
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: value)


def test_matrix_nms_per_class_products_equal_all_pairs(monkeypatch):
    # Eager mode multiplies the masks of each class only; an exported graph multiplies all pairs.
    # Pixel counts are exact in float32, so the decayed scores are the same, bit for bit.
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(40, 23, 31, generator=g) > 0.6
    labels = torch.randint(0, 5, (40,), generator=g)
    scores = torch.rand(40, generator=g).sort(descending=True).values
    per_class = matrix_nms(masks, labels, scores)
    _exporting(monkeypatch, True)
    all_pairs = matrix_nms(masks, labels, scores)
    assert torch.equal(per_class, all_pairs)
    assert (per_class < scores).any()  # some masks were decayed


def test_blocked_area_and_maskness_equal_the_whole_tensor_pass(monkeypatch):
    g = torch.Generator().manual_seed(4)
    soft = torch.rand(29, 13, 17, generator=g)  # 29 masks: 3 full blocks of 8 and a partial one
    pp = _postprocessor(mask_thresh=0.5)
    binary, area, mass = pp._binary_area_mass(soft)
    _exporting(monkeypatch, True)
    b_ref, a_ref, m_ref = pp._binary_area_mass(soft)
    assert binary.dtype == torch.bool and area.dtype == torch.int64 and mass.dtype == torch.float32
    assert torch.equal(binary, b_ref) and torch.equal(area, a_ref)
    assert torch.allclose(mass, m_ref, rtol=1e-6, atol=0)
    assert torch.equal(area, (soft > 0.5).sum(dim=(1, 2)))


def test_soft_masks_of_candidates_in_any_level_order():
    # Candidates come in level order by default (no reordering needed), or in score order with
    # NMS_PRE_BEFORE_MASKS: row r is always candidate r's mask.
    feats = [torch.arange(16.0)[:, None, None].expand(16, 4, 4), 100 + torch.arange(4.0)[:, None, None].expand(4, 4, 4)]
    pp = _postprocessor()

    def mask_fn(level, cells):
        return feats[level][cells]

    for levels, cells in (([0, 0, 1, 1], [3, 9, 0, 2]), ([1, 0, 1, 0], [2, 9, 0, 3])):
        soft = pp._soft_masks(torch.tensor(levels), torch.tensor(cells), mask_fn, (4, 4))
        expected = torch.tensor([(100.0 if lv else 0.0) + c for lv, c in zip(levels, cells)])
        assert torch.equal(soft[:, 0, 0], expected) and soft.shape == (4, 4, 4)
