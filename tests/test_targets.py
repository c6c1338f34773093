"""Grid targets, checked against cases computed by hand."""
import pytest
import torch
from detectron2.structures import BitMasks, Instances

from helpers import instances
from solo_d2.modeling import SOLOTargetGenerator

# The tiny config's grids, reference ranges scaled to 128 px; mask strides [4, 4, 8, 16, 16] on a 128x128 canvas.
GRIDS = [12, 10, 8, 6, 4]
RANGES = [[1, 24], [12, 48], [24, 96], [48, 192], [96, 2048]]
MASK_SIZES = [(32, 32), (32, 32), (16, 16), (8, 8), (8, 8)]


def generator(**kw):
    args = dict(num_classes=4, num_grids=GRIDS, scale_ranges=RANGES, sigma=0.2)
    args.update(kw)
    return SOLOTargetGenerator(**args)


def test_one_object_levels_cells_and_mask():
    # A 32x32 square at x 40..71, y 24..55: scale 32 -> levels 1 (12..48) and 2 (24..96).
    # Mass centre (55.5, 39.5). Level 1, S=10, cell size 12.8: centre cell (3, 4); centre region
    # y 36.3..42.7 -> rows 2..3, x 52.3..58.7 -> col 4. Level 2, S=8, cell 16: only (2, 3).
    gt = [instances(128, 128, [(40, 24, 72, 56, 2)])]
    t = generator()(gt, (128, 128), MASK_SIZES)
    assert [x.num_pos for x in t] == [0, 2, 1, 0, 0]
    assert t[1].pos_cell.tolist() == [2 * 10 + 4, 3 * 10 + 4]
    assert t[2].pos_cell.tolist() == [2 * 8 + 3]
    assert t[1].pos_img.tolist() == [0, 0] and t[2].pos_img.tolist() == [0]
    for x, s in zip(t, GRIDS):
        assert x.labels.shape == (1, s, s) and x.labels.dtype == torch.int64
    assert t[1].labels[0, 2, 4] == 2 and t[1].labels[0, 3, 4] == 2
    assert (t[1].labels == 2).sum() == 2 and (t[1].labels == 4).sum() == 98
    assert (t[0].labels == 4).all()

    # Mask targets: the square at stride 4 is rows 6..13, cols 10..17 (exact, edges aligned);
    # at stride 8, bilinear + >= 0.5 gives rows 3..6, cols 5..8.
    m1 = t[1].pos_masks()
    assert m1.shape == (2, 32, 32) and m1.dtype == torch.bool
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[6:14, 10:18] = True
    assert torch.equal(m1[0], expected) and torch.equal(m1[1], expected)
    expected2 = torch.zeros(16, 16, dtype=torch.bool)
    expected2[3:7, 5:9] = True
    assert torch.equal(t[2].pos_masks()[0], expected2)


def test_padded_canvas_is_used_for_cells():
    # Same square in a 128x120 image padded to 128x160: columns are normalised by 160.
    # Level 2: centre x 55.5 -> floor(55.5 * 8 / 160) = 2.
    gt = [instances(128, 120, [(40, 24, 72, 56, 2)])]
    t = generator()(gt, (128, 160), [(32, 40), (32, 40), (16, 20), (8, 10), (8, 10)])
    assert t[2].pos_cell.tolist() == [2 * 8 + 2]
    assert t[2].masks.shape == (1, 16, 20)


def test_centre_region_clipped_to_3x3():
    # sigma 1.0 makes the region cover the whole grid; it is clipped to one cell around the
    # centre cell (3, 3): 9 cells, rows and cols 2..4.
    gen = SOLOTargetGenerator(4, [8], [[1, 1000]], sigma=1.0)
    t = gen([instances(128, 128, [(8, 8, 120, 120, 1)])], (128, 128), [(32, 32)])
    cells = sorted(t[0].pos_cell.tolist())
    assert cells == [r * 8 + c for r in (2, 3, 4) for c in (2, 3, 4)]


def test_later_instance_wins_shared_cell():
    # Two concentric squares of different class: both claim the same cells; the later wins.
    gt = [instances(128, 128, [(40, 24, 72, 56, 0), (42, 26, 70, 54, 3)])]
    t = generator()(gt, (128, 128), MASK_SIZES)
    lv = t[2]
    assert lv.num_pos == 1 and lv.labels[0, 2, 3] == 3
    assert lv.masks.shape[0] == 1  # only the winner's mask is kept
    assert torch.equal(lv.pos_masks()[0], generator()([instances(128, 128, [(42, 26, 70, 54, 3)])],
                                                      (128, 128), MASK_SIZES)[2].pos_masks()[0])


def test_zero_area_and_empty_images():
    inst = instances(128, 128, [(40, 24, 72, 56, 1), (10, 10, 20, 20, 2)])
    inst.gt_masks.tensor[1] = False  # zero-area mask with a non-empty box
    empty = Instances((128, 128))
    empty.gt_masks = BitMasks(torch.zeros(0, 128, 128, dtype=torch.bool))
    empty.gt_classes = torch.zeros(0, dtype=torch.int64)
    t = generator()([empty, inst], (128, 128), MASK_SIZES)
    assert [x.num_pos for x in t] == [0, 2, 1, 0, 0]
    assert set(t[1].pos_img.tolist()) == {1}  # everything belongs to the second image
    assert (t[1].labels[0] == 4).all()
    t = generator()([empty], (128, 128), MASK_SIZES)
    assert all(x.num_pos == 0 and x.masks.shape[0] == 0 for x in t)
    assert all((x.labels == 4).all() for x in t)


def test_boxes_derived_from_masks_when_absent():
    a = instances(128, 128, [(40, 24, 72, 56, 2)])
    b = Instances((128, 128), gt_masks=a.gt_masks, gt_classes=a.gt_classes)
    ta, tb = generator()([a], (128, 128), MASK_SIZES), generator()([b], (128, 128), MASK_SIZES)
    for x, y in zip(ta, tb):
        assert torch.equal(x.labels, y.labels) and torch.equal(x.masks, y.masks)


def test_class_out_of_range_names_the_key():
    with pytest.raises(ValueError, match="MODEL.SOLO.NUM_CLASSES"):
        generator()([instances(64, 64, [(0, 0, 30, 30, 7)])], (64, 64), MASK_SIZES)


def test_many_instances_match_a_brute_force_assignment():
    # 150 random rectangles in 2 images: the vectorised owner of each cell must be the last
    # instance (in annotation order) whose centre region covers it, computed here by loops.
    g = torch.Generator().manual_seed(0)
    gts = []
    for _ in range(2):
        boxes = []
        for _ in range(75):
            w, h = torch.randint(4, 90, (2,), generator=g).tolist()
            x0 = int(torch.randint(0, 128 - w, (1,), generator=g))
            y0 = int(torch.randint(0, 128 - h, (1,), generator=g))
            boxes.append((x0, y0, x0 + w, y0 + h, int(torch.randint(0, 4, (1,), generator=g))))
        gts.append(instances(128, 128, boxes))
    gen = generator()
    t = gen(gts, (128, 128), MASK_SIZES)
    for level, (s, (lo, hi)) in enumerate(zip(GRIDS, RANGES)):
        owner = -torch.ones(2, s, s, dtype=torch.long)
        for b, inst in enumerate(gts):
            for i in range(len(inst)):
                x0, y0, x1, y1 = inst.gt_boxes.tensor[i].tolist()
                w, h = x1 - x0, y1 - y0
                if not lo <= (w * h) ** 0.5 <= hi:
                    continue
                m = inst.gt_masks.tensor[i]
                ys, xs = m.nonzero(as_tuple=True)
                cy, cx = ys.double().mean().item(), xs.double().mean().item()
                ci, cj = int(cy * s // 128), int(cx * s // 128)
                top = max(int((cy - 0.1 * h) * s // 128), ci - 1, 0)
                down = min(int((cy + 0.1 * h) * s // 128), ci + 1, s - 1)
                left = max(int((cx - 0.1 * w) * s // 128), cj - 1, 0)
                right = min(int((cx + 0.1 * w) * s // 128), cj + 1, s - 1)
                for r in range(top, down + 1):
                    for c in range(left, right + 1):
                        owner[b, r, c] = i
        expected_labels = torch.full((2, s, s), 4)
        for b in range(2):
            has = owner[b] >= 0
            expected_labels[b][has] = gts[b].gt_classes[owner[b][has]]
        assert torch.equal(t[level].labels, expected_labels), f"level {level}"
        assert t[level].num_pos == int((owner >= 0).sum())


@pytest.mark.parametrize("canvas,size", [((128, 160), (32, 40)), ((128, 160), (16, 20)), ((96, 64), (6, 4)), ((64, 64), (16, 21))])
def test_mask_resize_equals_bilinear_interpolation(canvas, size):
    # The strided 2x2 rule (even integer strides) and the float fallback (stride 64/21) must
    # both equal: paste on the zero canvas, bilinear resize (align_corners=False), >= 0.5.
    import torch.nn.functional as F

    from solo_d2.modeling.targets import _resize_masks

    g = torch.Generator().manual_seed(0)
    h, w = canvas[0] - 7, canvas[1] - 3  # an image smaller than the canvas, odd sizes
    masks = torch.rand(6, h, w, generator=g) > 0.5
    masks[0] = False
    masks[1] = True
    masks[2, 10:40, 5:30] = True
    padded = torch.zeros(6, 1, *canvas)
    padded[:, 0, :h, :w] = masks.float()
    expected = F.interpolate(padded, size=size, mode="bilinear", align_corners=False)[:, 0] >= 0.5
    assert torch.equal(_resize_masks(masks, canvas, size), expected)


def _polygon_and_bitmask_instances(device):
    """Two instances (a square and a triangle) as PolygonMasks and as BitMasks, classes and
    boxes on ``device`` (as ``Instances.to(model.device)`` leaves them: PolygonMasks stay on the
    host, BitMasks move)."""
    from detectron2.structures import Boxes, PolygonMasks

    polys = [[[10.0, 10.0, 40.0, 10.0, 40.0, 40.0, 10.0, 40.0]], [[60.0, 20.0, 100.0, 20.0, 80.0, 70.0]]]
    out = []
    for fmt in ("polygon", "bitmask"):
        inst = Instances((128, 128))
        pm = PolygonMasks(polys)
        inst.gt_masks = pm if fmt == "polygon" else BitMasks.from_polygon_masks(pm, 128, 128).to(device)
        inst.gt_classes = torch.tensor([1, 3], device=device)
        inst.gt_boxes = Boxes(pm.get_bounding_boxes().tensor.to(device))
        out.append(inst)
    return out


@pytest.mark.parametrize("fmt", ["polygon", "bitmask"])
def test_instance_geometry_stays_on_the_models_device(fmt):
    # On the "meta" device (shapes only), a tensor left on the host meets the instances' tensors
    # in an operation and raises: the masks must be built on the device, whatever the format.
    from solo_d2.modeling.targets import _instance_geometry

    inst = _polygon_and_bitmask_instances("meta")[("polygon", "bitmask").index(fmt)]
    geometry = _instance_geometry(inst, (128, 128))
    assert all(t.device.type == "meta" for t in geometry)
    masks, area, cy, cx, bw, bh = geometry
    assert masks.shape == (2, 128, 128) and masks.dtype == torch.bool
    assert area.dtype == torch.float64 and bw.shape == (2,)


def test_polygon_and_bitmask_training_targets_agree():
    polygon, bitmask = _polygon_and_bitmask_instances("cpu")
    a = generator()([polygon], (128, 128), MASK_SIZES)
    b = generator()([bitmask], (128, 128), MASK_SIZES)
    assert sum(x.num_pos for x in a) > 0
    for x, y in zip(a, b):
        assert torch.equal(x.labels, y.labels) and torch.equal(x.pos_cell, y.pos_cell)
        assert torch.equal(x.masks, y.masks)
