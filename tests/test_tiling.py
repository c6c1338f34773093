"""Tiled inference (solo_d2.inference): seams merged exactly, whole-image Matrix NMS equal to the
model's, cropped masks equal to full ones, TEST.TILE validation, and train_net.py --eval-only
with TEST.TILE.ENABLED. The seam cases use a stub predictor that returns the ground-truth masks
each tile sees, so that they are exact and fast."""
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.structures import Instances

from helpers import TINY_CONFIG, load_script, tiny_cfg
from solo_d2.checkpoint import PARTIAL_WEIGHTS_ENV
from solo_d2.config import check_tile_config
from solo_d2.inference import CroppedMasks, TiledPredictor, merge_seams, tile_windows
from solo_d2.modeling.postprocessing import matrix_nms, sparse_matrix_nms
from solo_d2.utils.cli import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class GTStub:
    """A tile predictor that returns the ground-truth masks visible in the tile (score 0.9,
    their classes; ``whole_score`` for the whole image, the whole-image pass). The image's
    channels 0 and 1 hold each pixel's x and y, so a tile knows where it is."""

    def __init__(self, masks, classes, whole_score=0.9):
        self.masks, self.classes, self.whole_score = masks, classes, whole_score
        self.calls = 0

    def __call__(self, crop):
        self.calls += 1
        x0, y0 = int(crop[0, 0, 0]), int(crop[0, 0, 1])
        h, w = crop.shape[:2]
        parts = self.masks[:, y0:y0 + h, x0:x0 + w]
        keep = parts.any(axis=(1, 2))
        inst = Instances((h, w))
        inst.pred_masks = torch.as_tensor(parts[keep])
        whole = (h, w) == self.masks.shape[1:]
        inst.scores = torch.full((int(keep.sum()),), self.whole_score if whole else 0.9)
        inst.pred_classes = torch.as_tensor(self.classes[keep], dtype=torch.int64)
        return {"instances": inst}


def coords_image(h, w):
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs, ys, np.zeros_like(xs)], axis=2).astype(np.int32)


def tiled(masks, classes, tile=100, overlap=20, whole_score=0.9, **kw):
    masks = np.stack(masks) if len(masks) else masks
    stub = GTStub(masks, np.asarray(classes, dtype=np.int64), whole_score)
    predictor = TiledPredictor(stub, tile_size=tile, overlap=overlap, min_image_ratio=0.0, **kw)
    return predictor(coords_image(*masks.shape[1:]))["instances"], stub


def rect(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def assert_same_instances(inst, gt):
    got = np.asarray(inst.pred_masks)
    assert len(got) == len(gt)
    for g in gt:  # each GT object exactly once, with its full mask
        assert sum(bool((m == g).all()) for m in got) == 1


def test_object_across_a_vertical_seam_is_one_instance_with_its_full_mask():
    gt = [rect(100, 180, 60, 30, 130, 60), rect(100, 180, 5, 5, 20, 20), rect(100, 180, 84, 70, 96, 90)]
    inst, stub = tiled(gt, [0, 1, 2])  # tiles x [0, 100) and [80, 180)
    assert stub.calls == 3  # two tiles and the whole-image pass
    assert_same_instances(inst, gt)
    boxes = inst.pred_boxes.tensor.tolist()
    assert [60, 30, 130, 60] in boxes


class ClassPerTileStub(GTStub):
    """:class:`GTStub` whose tiles name every object by the tile's column (class = 1 + x0 // 80):
    two tiles that see one object give it two classes."""

    def __call__(self, crop):
        out = super().__call__(crop)
        inst = out["instances"]
        inst.pred_classes = torch.full((len(inst),), 1 + int(crop[0, 0, 0]) // 80, dtype=torch.int64)
        return out


def test_an_object_two_tiles_name_differently_is_one_instance_by_default():
    # The object crosses the seam of tiles x [0, 100) and [80, 180); each tile calls it another
    # class. By default (TEST.TILE.MERGE_ACROSS_CLASSES True) it is one object with the full mask
    # and the class of its best-scored part; within a class only, it stays twice.
    gt = [rect(100, 180, 60, 30, 130, 60)]
    stub = ClassPerTileStub(np.stack(gt), np.array([0]))
    image = coords_image(100, 180)
    inst = TiledPredictor(stub, tile_size=100, overlap=20, min_image_ratio=0.0,
                          whole_image_pass=False)(image)["instances"]
    assert_same_instances(inst, gt)
    assert inst.pred_classes.tolist()[0] in (1, 2)
    apart = TiledPredictor(stub, tile_size=100, overlap=20, min_image_ratio=0.0,
                           whole_image_pass=False, merge_across_classes=False)(image)["instances"]
    assert sorted(apart.pred_classes.tolist()) == [1, 2]


def test_object_over_the_corner_of_four_tiles_is_one_instance():
    ys, xs = np.mgrid[0:180, 0:180]
    disc = (xs - 90) ** 2 + (ys - 90) ** 2 <= 30 ** 2
    inst, stub = tiled([disc], [3], whole_image_pass=False)
    assert stub.calls == 4
    assert_same_instances(inst, [disc])


def test_two_touching_objects_across_a_seam_stay_two():
    gt = [rect(100, 180, 50, 30, 90, 60), rect(100, 180, 90, 30, 130, 60)]
    inst, _ = tiled(gt, [0, 0])
    assert_same_instances(inst, gt)


def test_without_merging_the_seam_object_is_seen_twice():
    gt = [rect(100, 180, 60, 30, 130, 60)]
    inst, _ = tiled(gt, [0], merge_iou=2.0, merge_cover=2.0)
    assert len(inst) == 2


def test_a_fragment_inside_the_other_tiles_mask_merges_despite_a_low_iou():
    """Tile 0 cuts the object at x = 100; tile 1's mask is taller: IoU 0.375 in the common
    region x [80, 100), but all of tile 0's part there lies in tile 1's mask."""
    windows = np.array([[0, 0, 100, 100], [80, 0, 180, 100]])
    masks = CroppedMasks(np.array([[60, 30, 100, 60], [80, 10, 140, 90]]),
                         [np.ones((30, 40), bool), np.ones((80, 60), bool)], (100, 180))
    args = masks, np.array([0.9, 0.8]), np.array([0, 0]), np.array([0, 1]), windows, 0.5
    assert len(merge_seams(*args, merge_cover=2.0)[0]) == 2
    merged, scores, _, seen_by = merge_seams(*args, merge_cover=0.8)
    assert len(merged) == 1 and scores.tolist() == [0.9] and seen_by.all()
    assert merged.boxes.tolist() == [[60, 10, 140, 90]]  # both cut: the union


def test_two_tiles_naming_one_object_differently_merge_across_classes_only_if_asked():
    windows = np.array([[0, 0, 100, 100], [80, 0, 180, 100]])
    masks = CroppedMasks(np.array([[60, 30, 100, 60], [80, 30, 130, 60]]),
                         [np.ones((30, 40), bool), np.ones((30, 50), bool)], (100, 180))
    args = masks, np.array([0.7, 0.8]), np.array([2, 1]), np.array([0, 1]), windows, 0.5
    assert len(merge_seams(*args)[0]) == 2
    merged, scores, classes, _ = merge_seams(*args, across_classes=True)
    assert merged.boxes.tolist() == [[60, 30, 130, 60]] and classes.tolist() == [1]


def test_a_large_object_comes_whole_from_the_whole_image_pass():
    """A 150 x 40 object over three tiles (tile 100, overlap 20, stride 80: longer than the
    stride) comes out once, with the whole-image pass's mask and score, even with seam merging
    off: the tiles' parts lie inside it and are dropped. Small objects come from the tiles, also
    one lying inside the large object's mask (as on top of it, under a coarse mask)."""
    h, w = 100, 260
    gt = [rect(h, w, 40, 30, 190, 70), rect(h, w, 200, 10, 215, 25), rect(h, w, 10, 75, 22, 90),
          rect(h, w, 120, 40, 135, 55)]
    inst, stub = tiled(gt, [0, 1, 2, 3], whole_score=0.95, merge_iou=2.0, merge_cover=2.0)
    assert stub.calls == 4
    assert_same_instances(inst, gt)
    by_box = dict(zip(map(tuple, inst.pred_boxes.tensor.int().tolist()), inst.scores.tolist()))
    assert by_box[(40, 30, 190, 70)] == pytest.approx(0.95)  # the whole-image pass
    for small in [(200, 10, 215, 25), (10, 75, 22, 90), (120, 40, 135, 55)]:
        assert by_box[small] == pytest.approx(0.9)  # from the tiles
    without, _ = tiled(gt, [0, 1, 2, 3], whole_score=0.95, merge_iou=2.0, merge_cover=2.0,
                       whole_image_pass=False)
    assert len(without) == 6  # the large object in three parts


def test_whole_image_min_size_sends_objects_to_the_tiles():
    gt = [rect(100, 260, 40, 30, 190, 70)]
    inst, _ = tiled(gt, [0], whole_score=0.95, whole_image_min_size=200)
    assert_same_instances(inst, gt)  # merged from the tiles' parts
    assert inst.scores.tolist() == [pytest.approx(0.9)]


def test_no_detections_give_empty_instances():
    inst, _ = tiled(np.zeros((0, 100, 180), bool), [])
    assert len(inst) == 0 and inst.pred_boxes.tensor.shape == (0, 4)


def test_small_images_go_to_the_predictor_whole():
    stub = GTStub(np.stack([rect(120, 120, 10, 10, 30, 30)]), np.array([0]))
    out = TiledPredictor(stub, tile_size=100, overlap=20)(coords_image(120, 120))["instances"]
    assert stub.calls == 1 and isinstance(out.pred_masks, torch.Tensor)


def test_tile_windows_cover_the_image_with_the_overlap():
    wins = np.array(tile_windows(300, 530, 128, 32))
    assert (wins[:, 2] - wins[:, 0] == 128).all() and (wins[:, 3] - wins[:, 1] == 128).all()
    covered = np.zeros((300, 530), bool)
    for x0, y0, x1, y1 in wins:
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    xs = sorted(set(wins[:, 0].tolist()))
    assert all(b - a <= 128 - 32 for a, b in zip(xs, xs[1:]))
    assert tile_windows(50, 60, 128, 32) == [(0, 0, 60, 50)]
    with pytest.raises(ValueError, match="overlap"):
        tile_windows(300, 300, 128, 128)


def test_cropped_masks_equal_full_masks_and_their_rle():
    rng = np.random.default_rng(0)
    full = rng.random((6, 40, 50)) > 0.8
    full[1] = False
    full[2] = rect(40, 50, 45, 0, 50, 40)
    m = CroppedMasks.from_masks(full[:, 5:35, 10:40], (10, 5), (40, 50))
    window = np.zeros_like(full)
    window[:, 5:35, 10:40] = full[:, 5:35, 10:40]
    assert (np.asarray(m) == window).all()
    assert [x.tolist() for x in m] == [x.tolist() for x in window]
    for i in range(len(m)):
        assert m.rle(i)["counts"] == mask_util.encode(np.asfortranarray(window[i].astype(np.uint8)))["counts"]
    assert m[torch.tensor([False, True, True, False, False, True])].boxes.shape == (3, 4)
    assert m.intersection(0, 3) == int((window[0] & window[3]).sum())


def test_sparse_matrix_nms_equals_matrix_nms():
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(25, 48, 48, dtype=torch.bool)
    for i in range(25):
        x, y = torch.randint(0, 36, (2,), generator=g).tolist()
        masks[i, y:y + 12, x:x + 12] = True
    labels = torch.randint(0, 3, (25,), generator=g)
    scores = torch.rand(25, generator=g).sort(descending=True).values
    f = masks.flatten(1).float()
    inter = f @ f.t()
    area = f.sum(1)
    i, j = torch.triu_indices(25, 25, 1)
    sel = (labels[i] == labels[j]) & (inter[i, j] > 0)
    i, j = i[sel], j[sel]
    for kernel in ("gaussian", "linear"):
        ious = torch.sparse_coo_tensor(torch.stack([i, j]), inter[i, j] / (area[i] + area[j] - inter[i, j]),
                                       (25, 25), check_invariants=True)
        sparse = sparse_matrix_nms(scores, ious, kernel)
        assert torch.allclose(sparse, matrix_nms(masks, labels, scores, kernel), atol=1e-6)


def test_sparse_matrix_nms_refuses_malformed_ious():
    def coo(pairs, ious, k=3):
        return torch.sparse_coo_tensor(torch.tensor(pairs, dtype=torch.long).reshape(2, -1),
                                       torch.tensor(ious), (k, k), check_invariants=True)

    scores = torch.tensor([0.9, 0.8, 0.7])
    with pytest.raises(ValueError, match=r"\(3, 3\) sparse COO"):
        sparse_matrix_nms(scores, torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"\(3, 3\) sparse COO"):
        sparse_matrix_nms(scores, coo([[0], [1]], [0.5], k=4))
    with pytest.raises(ValueError, match="more than once"):
        sparse_matrix_nms(scores, coo([[0, 0], [1, 1]], [0.5, 0.5]))
    with pytest.raises(ValueError, match="i < j"):
        sparse_matrix_nms(scores, coo([[2], [1]], [0.5]))
    # no pairs: nothing decays
    assert torch.equal(sparse_matrix_nms(scores, coo([], [])), scores)


def test_tile_config_errors_name_the_keys():
    cfg = tiny_cfg()
    check_tile_config(cfg)  # defaults are valid
    cfg.TEST.TILE.OVERLAP = 128  # the test size of the tiny config
    cfg.TEST.TILE.MAX_PER_IMAGE = 0
    with pytest.raises(ConfigError, match=r"TEST.TILE.OVERLAP = 128.*\n.*TEST.TILE.MAX_PER_IMAGE = 0"):
        TiledPredictor(cfg, GTStub(np.zeros((0, 1, 1), bool), np.zeros(0)))
    cfg = tiny_cfg()
    cfg.TEST.TILE.SIZE = -5
    with pytest.raises(ConfigError, match="TEST.TILE.SIZE = -5"):
        check_tile_config(cfg)
    cfg = tiny_cfg()
    cfg.TEST.TILE.WHOLE_IMAGE_PASS = "yes"
    cfg.TEST.TILE.WHOLE_IMAGE_MIN_SIZE = -1
    cfg.TEST.TILE.WHOLE_IMAGE_COVER = 0.0
    cfg.TEST.TILE.MERGE_COVER = -0.5
    cfg.TEST.TILE.MERGE_ACROSS_CLASSES = 1
    with pytest.raises(ConfigError, match=r"MERGE_COVER = -0.5.*\n.*MERGE_ACROSS_CLASSES = 1.*\n"
                                          r".*WHOLE_IMAGE_PASS = 'yes'"
                                          r".*\n.*WHOLE_IMAGE_MIN_SIZE = -1.*\n.*WHOLE_IMAGE_COVER = 0.0"):
        check_tile_config(cfg)
    t = TiledPredictor(tiny_cfg(), None)
    assert (t.tile_size, t.overlap, t.max_per_image) == (128, 64, 1000)
    assert (t.whole_image_pass, t.whole_image_min_size, t.whole_image_cover) == (True, 64, 0.5)


def test_train_net_eval_only_with_tiling(tiny_dataset, tmp_path, monkeypatch):
    """train_net.py --eval-only's path (its main, in this process) with TEST.TILE.ENABLED on the
    tiny model: the images (128 px) are cut into four 96 px tiles, and COCO's evaluator reads the
    cropped masks."""
    train_net = load_script("train_net.py", "solo_train_net_tiling")
    monkeypatch.setenv(PARTIAL_WEIGHTS_ENV, "1")  # random weights
    args = train_net.argument_parser().parse_args([
        "--config-file", TINY_CONFIG, "--eval-only", "MODEL.DEVICE", "cpu",
        "DATASETS.TEST", f"('{tiny_dataset}',)", "OUTPUT_DIR", str(tmp_path / "out"),
        "TEST.TILE.ENABLED", "True", "TEST.TILE.SIZE", "96", "TEST.TILE.OVERLAP", "32",
        "TEST.TILE.MIN_IMAGE_RATIO", "0.0",
        # random weights (scores ~0.01, soft masks ~0.01): low thresholds, so that there are
        # instances to merge and score; few candidates
        "MODEL.SOLO.SCORE_THRESH_TEST", "0.0", "MODEL.SOLO.UPDATE_THRESH_TEST", "0.0",
        "MODEL.SOLO.MASK_THRESH_TEST", "0.001", "MODEL.SOLO.NMS_PRE", "6",
        "MODEL.SOLO.NMS_PRE_BEFORE_MASKS", "True", "MODEL.SOLO.MAX_PER_IMAGE", "3",
    ])
    results = train_net.main(args)
    assert "segm" in results and "AP" in results["segm"]
    written = tmp_path / "out" / "inference" / tiny_dataset / "coco_instances_results.json"
    preds = json.loads(written.read_text())
    assert preds and all(p["segmentation"]["size"] == [128, 128] for p in preds)
