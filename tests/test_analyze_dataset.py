"""Grid coverage (solo_d2/analysis/grid_coverage.py), the grid suggestion, tools/analyze_dataset.py,
train_net's coverage summary and MODEL.SOLO.CATE_ALIGN, on hand-built cases."""
import json

import numpy as np
import pytest
import torch
import yaml

from helpers import load_script, run_train_net, solo_test_cfg
from solo_d2.analysis.grid_coverage import grid_coverage_from_cfg, object_geometry
from solo_d2.analysis.grid_suggestion import suggest_grids
from solo_d2.engine import setup_cfg

SHAPES = "configs/Shapes/SOLO_R18_shapes.yaml"


def cfg256(**opts):
    """The shapes config (256 px, grids [24, 20, 14, 10, 8]) with flat KEY=VALUE overrides."""
    from helpers import REPO

    cfg = solo_test_cfg(str(REPO / SHAPES))
    for k, v in opts.items():
        cfg.merge_from_list([k.replace("__", "."), v])
    return cfg


def square(x, y, side, crowd=0):
    """A side x side square annotation at (x, y) (polygon; box XYWH)."""
    from detectron2.structures import BoxMode

    return {
        "bbox": [x, y, side, side], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
        "segmentation": [[x, y, x + side, y, x + side, y + side, x, y + side]], "iscrowd": crowd,
    }


def image(anns, h=256, w=256, i=0):
    return {"file_name": f"{i}.png", "image_id": i, "height": h, "width": w, "annotations": anns}


def coverage(dicts, cfg):
    return grid_coverage_from_cfg(cfg, object_geometry(dicts))


def assert_counts(cov, assigned, c1, c2, c3):
    assert (cov.assigned, cov.cause1, cov.cause2, cov.cause3) == (assigned, c1, c2, c3), cov.table()


# ---- the three causes, counted exactly ----------------------------------------------------------
CAUSE1 = dict(MODEL__SOLO__SCALE_RANGES="[[20, 48], [24, 96], [48, 192], [96, 384], [192, 2048]]")
CAUSE2 = dict(MODEL__SOLO__NUM_GRIDS="[8, 8, 8, 8, 8]")
CAUSE3 = dict(MODEL__SOLO__NUM_GRIDS="[2, 20, 14, 10, 8]")


def cause1_case():
    # Scale 10 px: below every range (the lowest starts at 20). A 30 px object is kept.
    return [image([square(100, 100, 10), square(10, 10, 30)])], cfg256(**CAUSE1)


def cause2_case():
    # Two 30 px squares 6 px apart (on levels 0 and 1): with grids of 8 (32 px cells) both
    # centres and centre regions lie in cell (3, 3) of both levels; the later one wins both.
    return [image([square(100, 100, 30), square(106, 100, 30)])], cfg256(**CAUSE2)


def cause3_case():
    # An 8 px square at (20, 20) in a 128 px cell of level 0 (grid 2): it owns cell (0, 0),
    # whose centre (64, 64) is far outside it.
    return [image([square(20, 20, 8)])], cfg256(**CAUSE3)


def cause2_large_case():
    # Two 400 px squares 16 px apart in a 512 px image trained at 512 px: scale 400 is on
    # level 4 only (192-2048), whose grid of 8 (64 px cells) gives both the same cells; the
    # later one wins them all.
    cfg = cfg256(INPUT__MIN_SIZE_TRAIN="(512,)", INPUT__MAX_SIZE_TRAIN="512")
    return [image([square(40, 40, 400), square(56, 56, 400)], h=512, w=512)], cfg


def test_cause1_scale_in_no_range_is_counted():
    dicts, cfg = cause1_case()
    cov = coverage(dicts, cfg)
    assert_counts(cov, 1, 1, 0, 0)
    assert cov.on_level == [1, 1, 0, 0, 0] and cov.num_objects == 2


def test_cause2_two_objects_on_one_cell_the_first_loses():
    dicts, cfg = cause2_case()
    cov = coverage(dicts, cfg)
    assert_counts(cov, 1, 0, 1, 0)
    assert cov.on_level[:2] == [2, 2] and cov.pos_level[:2] == [1, 1]
    assert cov.cause2_level[:2] == [1, 1] and cov.cause2_scales.tolist() == [30.0]
    # The same two objects in the other order: still one lost (the earlier one).
    dicts[0]["annotations"].reverse()
    assert_counts(coverage(dicts, cfg), 1, 0, 1, 0)


def test_cause3_tiny_object_in_a_huge_cell():
    dicts, cfg = cause3_case()
    cov = coverage(dicts, cfg)
    assert_counts(cov, 0, 0, 0, 1)
    assert cov.cause3_level[0] == 1 and cov.cells_level[0] == 1
    # The same object in a 10.7 px cell (grid 24): its cell centre is inside it.
    assert_counts(coverage(dicts, cfg256()), 1, 0, 0, 0)


@pytest.mark.parametrize("case", [cause1_case, cause2_case, cause2_large_case, cause3_case])
def test_suggestion_keeps_every_object(case, tmp_path):
    dicts, cfg = case()
    sug = suggest_grids(cfg, object_geometry(dicts))
    cov = sug.coverage
    assert_counts(cov, cov.num_objects, 0, 0, 0)
    assert sug.reasons and "result" in sug.reasons[-1]
    # The written config, loaded the way train_net.py loads it, gives the same coverage.
    base = tmp_path / "base.yaml"
    base.write_text(cfg.dump())
    out = tmp_path / "sub" / "suggested.yaml"
    out.parent.mkdir()
    out.write_text(sug.yaml(str(base), str(out)))
    args = type("Args", (), dict(config_file=str(out), opts=["OUTPUT_DIR", str(tmp_path / "o")],
                                 eval_only=False, resume=False))()
    loaded = setup_cfg(args)
    assert list(loaded.MODEL.SOLO.NUM_GRIDS) == sug.num_grids
    assert [tuple(r) for r in loaded.MODEL.SOLO.SCALE_RANGES] == [tuple(r) for r in sug.scale_ranges]
    assert_counts(coverage(dicts, loaded), cov.num_objects, 0, 0, 0)
    # The printed "as options" give the same settings on top of the analysed config.
    merged = cfg.clone()
    merged.merge_from_list(sug.opts)
    for key, _ in sug.settings():
        a, b = merged, loaded
        for part in key.split("."):
            a, b = a[part], b[part]
        assert str(a) == str(b), key


def test_suggestion_that_scales_the_input_writes_the_same_sizes_as_its_options(tmp_path):
    # A 2 px object: level 0's grid reaches its cap (half a stride-8 pixel), so the input grows
    # x2.1875 (256 -> 576 px, rounded to 32) and grid 140 keeps it.
    cfg = cfg256()
    sug = suggest_grids(cfg, object_geometry([image([square(100, 100, 2)])]))
    assert sug.changed_input and sug.num_grids == [140, 20, 14, 10, 8]
    assert sug.opts[4:] == ["INPUT.MIN_SIZE_TRAIN", "(576,)", "INPUT.MAX_SIZE_TRAIN", "576",
                            "INPUT.MIN_SIZE_TEST", "576", "INPUT.MAX_SIZE_TEST", "576"]
    base = tmp_path / "base.yaml"
    base.write_text(cfg.dump())
    out = tmp_path / "suggested.yaml"
    out.write_text(sug.yaml(str(base), str(out)))
    loaded = solo_test_cfg(str(out))
    merged = cfg.clone()
    merged.merge_from_list(sug.opts)
    assert tuple(loaded.INPUT.MIN_SIZE_TRAIN) == tuple(merged.INPUT.MIN_SIZE_TRAIN) == (576,)
    assert loaded.INPUT.MAX_SIZE_TEST == merged.INPUT.MAX_SIZE_TEST == 576
    assert list(loaded.MODEL.SOLO.NUM_GRIDS) == list(merged.MODEL.SOLO.NUM_GRIDS) == [140, 20, 14, 10, 8]


def test_suggestion_explains_a_finer_grid_for_small_objects():
    dicts, cfg = cause3_case()
    sug = suggest_grids(cfg, object_geometry(dicts))
    # An 8 px object needs cells of at most 8 / sqrt(2) px: ceil(sqrt(2) * 256 / 8) = 46.
    assert sug.num_grids[0] == 46
    assert any("level 0: grid 2 -> 46" in r for r in sug.reasons)


def test_suggestion_puts_colliding_objects_on_a_finer_level_before_growing_grids():
    dicts, cfg = cause2_large_case()
    assert_counts(coverage(dicts, cfg), 1, 0, 1, 0)
    sug = suggest_grids(cfg, object_geometry(dicts))
    # Level 3 (grid 10, 51.2 px cells, range 96-384) also takes the 400 px objects: their
    # centres, 16 px apart, fall in different cells there. The grids stay as they are.
    assert sug.num_grids == [24, 20, 14, 10, 8]
    assert sug.scale_ranges == [(1, 48), (24, 96), (48, 192), (96, 400), (192, 2048)]
    assert sug.coverage.on_level == [0, 0, 0, 2, 2] and sug.coverage.cause2_level == [0, 0, 0, 0, 1]
    assert sug.reasons[0] == (
        "level 3 range ends at 400 (was 384): 1 objects of 400-400 px lost to cells taken by later objects "
        "on level 4 (cause 2) are also put on level 3, whose 51.2 px cells tell them apart; this adds no grid cells"
    )


def test_suggestion_states_the_cost_of_a_grid_finer_than_its_feature():
    # Level 0 reads the stride-8 feature: 32 pixels across the 256 px canvas. Grid 46 is finer
    # and has (46 / 2)**2 = 529 times the cells of grid 2; the note precedes the result line.
    dicts, cfg = cause3_case()
    sug = suggest_grids(cfg, object_geometry(dicts))
    notes = [r for r in sug.reasons if r.startswith("cost:")]
    assert len(notes) == 1 and "level 0's grid 46" in notes[0] and "32 stride-8 pixels" in notes[0]
    assert "529x the cells of grid 2" in notes[0] and "result" in sug.reasons[-1]
    # Grids of 8 grown for two colliding objects to [22, 13, 8, 8, 8]: within the features'
    # pixels across the canvas ([32, 32, 16, 8, 8]), so no note.
    dicts, cfg = cause2_case()
    sug = suggest_grids(cfg, object_geometry(dicts))
    assert sug.num_grids == [22, 13, 8, 8, 8]
    assert not any(r.startswith("cost:") for r in sug.reasons)


# ---- datasets without objects, crowd only, mixed sizes -------------------------------------------
def test_dataset_without_objects():
    dicts = [image([]), image([], i=1)]
    cov = coverage(dicts, cfg256())
    assert cov.num_objects == 0 and cov.assigned == 0 and cov.warnings() == []
    assert "0 objects" in cov.table()
    sug = suggest_grids(cfg256(), object_geometry(dicts))
    assert sug.num_grids == [24, 20, 14, 10, 8]


def test_crowd_only_annotations_are_ignored_and_counted(tmp_path):
    dicts = [image([square(10, 10, 40, crowd=1), square(60, 60, 40, crowd=1)])]
    cov = coverage(dicts, cfg256())
    assert cov.num_objects == 0 and cov.num_crowd == 2
    assert "2 crowd" in cov.table()
    cov.plot(str(tmp_path / "h.png"))
    assert (tmp_path / "h.png").stat().st_size > 0


def test_images_of_mixed_sizes_and_two_train_sizes():
    # Ranges one per scale band; a 10 px object in a 256 x 256 image and a 10 px object in a
    # 128 x 512 image. At shortest edge 256 (max 1024) the second image is scaled x2 (its
    # object: 20 px); at 128, the first is scaled x0.5 (5 px) and the second x1 (10 px).
    cfg = cfg256(
        MODEL__SOLO__SCALE_RANGES="[[1, 7], [8, 15], [16, 30], [31, 60], [61, 2048]]",
        INPUT__MIN_SIZE_TRAIN="(128, 256)", INPUT__MAX_SIZE_TRAIN="1024",
    )
    dicts = [image([square(100, 100, 10)]), image([square(200, 50, 10)], h=128, w=512, i=1)]
    cov = coverage(dicts, cfg)
    assert cov.num_objects == 4 and cov.sizes == [128, 256]
    assert cov.on_level == [1, 2, 1, 0, 0]
    assert sorted(cov.scales.tolist()) == [5.0, 10.0, 10.0, 20.0]
    assert cov.canvas_max == 1024


def test_rle_and_polygon_give_the_same_centre():
    import pycocotools.mask as mask_util

    m = np.zeros((64, 64), np.uint8)
    m[20:30, 40:60] = 1
    rle = mask_util.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    poly = square(40, 20, 10)
    poly["segmentation"] = [[40, 20, 60, 20, 60, 30, 40, 30]]
    poly["bbox"] = [40, 20, 20, 10]
    as_rle = dict(poly, segmentation=rle)
    g = object_geometry([image([poly, as_rle], 64, 64)])
    assert np.allclose(g.cx, [50, 50]) and np.allclose(g.cy, [25, 25])


def test_missing_image_size_is_an_error_naming_the_image():
    d = image([square(1, 1, 5)])
    del d["height"]
    with pytest.raises(ValueError, match="0.png"):
        object_geometry([d])


# ---- the tool and train_net ----------------------------------------------------------------------
def test_analyze_dataset_tool_prints_the_table_and_writes_a_config(tmp_path, capsys):
    from helpers import REPO

    tool = load_script("tools/analyze_dataset.py")
    root = tmp_path / "data"
    root.mkdir()
    coco = {
        "images": [{"id": 1, "file_name": "1.png", "height": 256, "width": 256}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 20, 8, 8], "area": 64, "iscrowd": 0,
             "segmentation": [[20, 20, 28, 20, 28, 28, 20, 28]]},
        ],
        "categories": [{"id": 1, "name": "a"}],
    }
    (root / "train.json").write_text(json.dumps(coco))
    import cv2

    cv2.imwrite(str(root / "1.png"), np.zeros((256, 256, 3), np.uint8))  # the json is validated
    out_cfg = tmp_path / "suggested.yaml"
    tool.main(["--config-file", str(REPO / SHAPES), "--json", str(root / "train.json"), "--suggest",
               "--write-config", str(out_cfg), "--output", str(tmp_path / "out"),
               "MODEL.SOLO.NUM_GRIDS", "[2, 20, 14, 10, 8]", "MODEL.SOLO.CATE_ALIGN", "adaptive_pool",
               "INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MIN_SIZE_TEST", "320"])
    text = capsys.readouterr().out
    assert "(3) cell too large for the object 1 (100.0%)" in text
    assert "level 0: grid 2 -> 46" in text
    assert (tmp_path / "out" / "scales.png").is_file()
    written = yaml.safe_load(out_cfg.read_text())
    assert written["MODEL"]["SOLO"]["NUM_GRIDS"][0] == 46
    # The options the analysis was given travel with the suggestion, so that training sees the
    # config (and the input sizes) the analysis saw; the suggestion's own keys win.
    assert written["MODEL"]["SOLO"]["CATE_ALIGN"] == "adaptive_pool"
    assert written["INPUT"]["MIN_SIZE_TRAIN"] == [256] and written["INPUT"]["MIN_SIZE_TEST"] == 320
    # (Loaded without train_net's logging set-up: its handlers would keep capsys's closed stream.)
    loaded = solo_test_cfg(str(out_cfg))
    assert loaded.MODEL.SOLO.CATE_ALIGN == "adaptive_pool" and tuple(loaded.INPUT.MIN_SIZE_TRAIN) == (256,)
    assert loaded.MODEL.SOLO.NUM_GRIDS[0] == 46 and loaded.INPUT.MIN_SIZE_TEST == 320


@pytest.mark.slow
def test_train_net_logs_the_coverage_summary_and_a_warning(tmp_path):
    # Grids of 1 (one 128 px cell per level): objects away from the image centre miss the
    # cell's centre (cause 3; one of the three objects of this dataset).
    from test_custom_dataset import write_coco

    train_json, img_dir, _ = write_coco(tmp_path / "data")
    res = run_train_net(
        ["--train-json", str(train_json), "--train-images", str(img_dir), "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(tmp_path / "out"),
         "MODEL.SOLO.NUM_GRIDS", "[1, 1, 1, 1, 1]"],
        cwd=tmp_path,
    )
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert "Grid coverage of the training objects" in log
    warnings = [line for line in log.splitlines() if "WARNING" in line and "of the training objects" in line]
    assert any("33.3% of the training objects (1 of 3)" in w and "cause 3" in w for w in warnings), log[-3000:]


# ---- MODEL.SOLO.CATE_ALIGN ------------------------------------------------------------------------
def head(mode):
    from solo_d2.modeling.solo_head import SOLOHead

    return SOLOHead(num_classes=2, in_channels=1, num_grids=[2], conv_channels=4, num_stacked_convs=1,
                    norm="", cate_align=mode)


def test_cate_align_modes_on_a_hand_case():
    # 6 x 6 feature with a single 1 at (0, 0), grid 2 (3 x 3 pixel cells):
    # bilinear samples cell (0, 0) at its centre, pixel (1, 1): 0;
    # adaptive max-pooling takes the max of the 3 x 3 block: 1;
    # region-grid interpolation averages k = 3 x 3 bilinear samples at the sub-cell centres,
    # which are the block's pixels: 1/9.
    f = torch.zeros(1, 1, 6, 6)
    f[0, 0, 0, 0] = 1
    want = {"bilinear": 0.0, "adaptive_pool": 1.0, "region_grid": 1.0 / 9}
    for mode, v in want.items():
        out = head(mode).cate_input(f, 2)
        assert out.shape == (1, 1, 2, 2)
        assert out[0, 0, 0, 0].item() == pytest.approx(v), mode
        assert out[0, 0, 1:, :].abs().sum() == 0 and out[0, 0, 0, 1] == 0


def test_cate_align_linear_feature_and_upsampling():
    # A feature linear in x: every mode that averages symmetric samples gives the cell-centre
    # value; 4 x 4 -> 2 x 2 cells of 2 x 2 pixels, x = 0..3: centres 0.5 and 2.5.
    f = torch.arange(4.0).repeat(4, 1)[None, None]
    for mode in ("bilinear", "region_grid"):
        out = head(mode).cate_input(f, 2)
        assert torch.allclose(out[0, 0], torch.tensor([[0.5, 2.5], [0.5, 2.5]])), mode
    assert torch.equal(head("adaptive_pool").cate_input(f, 2)[0, 0], torch.tensor([[1.0, 3.0], [1.0, 3.0]]))
    # A grid finer than the feature (S > H): every mode gives S x S.
    for mode in ("bilinear", "adaptive_pool", "region_grid"):
        assert head(mode).cate_input(f, 7).shape == (1, 1, 7, 7)


def test_cate_align_from_config_and_bad_value():
    from solo_d2.modeling.solo_head import build_solo_head
    from detectron2.layers import ShapeSpec

    cfg = solo_test_cfg(opts=["MODEL.SOLO.CATE_ALIGN", "region_grid"])
    shapes = [ShapeSpec(channels=64, stride=s) for s in (4, 8, 16, 32, 64)]
    h = build_solo_head(cfg, shapes)
    assert h.cate_align == "region_grid"
    feats = [torch.randn(1, 64, 128 // s, 128 // s) for s in (4, 8, 16, 32, 64)]
    cate, _ = h(feats)
    assert [tuple(c.shape[-2:]) for c in cate] == [(s, s) for s in cfg.MODEL.SOLO.NUM_GRIDS]
    cfg.MODEL.SOLO.CATE_ALIGN = "nearest"
    with pytest.raises(ValueError, match="CATE_ALIGN = 'nearest'"):
        build_solo_head(cfg, shapes)


def test_histogram_without_matplotlib_is_drawn_with_cv2(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    dicts, cfg = cause1_case()
    cov = coverage(dicts, cfg)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    path = cov.plot(str(tmp_path / "h.png"))
    import cv2

    assert cv2.imread(path).shape == (400, 880, 3)
