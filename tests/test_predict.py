"""tools/predict.py and solo_d2.inference.coco_results: COCO results that round-trip through
COCO.loadRes (AP 100 on ground truth written as predictions), polygons and RLE that agree with
the masks, indexed mask PNGs, unreadable images reported with a non-zero exit status, clear
output path errors. A stub predictor returns each image's ground truth (no model)."""
import json

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.structures import Instances

from helpers import TINY_CONFIG, load_script
from solo_d2.inference import evaluate_segm, indexed_mask_image, instances_to_coco_results
from solo_d2.utils.cli import run_main

H, W = 40, 50


def gt_masks(i):
    """Image i's objects: (masks (K, H, W) bool, classes (K,)); object 0 has a hole."""
    ys, xs = np.mgrid[0:H, 0:W]
    ring = ((xs - 12) ** 2 + (ys - 12) ** 2 <= 81) & ((xs - 12) ** 2 + (ys - 12) ** 2 > 9)
    tri = (ys >= 20) & (xs >= 20 + i) & (xs - 20 - i <= ys - 20)
    box = np.zeros((H, W), bool)
    box[2:12, 30 + i:45] = True
    return np.stack([ring, tri, box]), np.array([0, 2, 3])


def instances_of(masks, classes, scores=(0.9, 0.8, 0.7)):
    inst = Instances((H, W))
    inst.pred_masks = torch.as_tensor(masks)
    inst.scores = torch.tensor(scores[:len(masks)])
    inst.pred_classes = torch.as_tensor(classes, dtype=torch.int64)
    return inst


def write_gt(path, names):
    images, anns = [], []
    for i, name in enumerate(names):
        images.append({"id": 10 + i, "file_name": name, "height": H, "width": W})
        masks, classes = gt_masks(i)
        for m, c in zip(masks, classes):
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append({"id": len(anns) + 1, "image_id": 10 + i, "category_id": int(c) + 1,
                         "segmentation": {"size": [H, W], "counts": rle["counts"].decode()},
                         "area": int(m.sum()), "bbox": mask_util.toBbox(rle).tolist(), "iscrowd": 0})
    cats = [{"id": k + 1, "name": f"c{k}"} for k in range(4)]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(path)


def test_ground_truth_as_predictions_round_trips_with_ap_100(tmp_path):
    gt = write_gt(tmp_path / "gt.json", ["a.png", "b.png"])
    results = []
    for i in range(2):
        results += instances_to_coco_results(instances_of(*gt_masks(i)), 10 + i, f"{i}.png", [1, 2, 3, 4])
    results = json.loads(json.dumps(results))  # what a json file gives back
    assert {r["category_id"] for r in results} == {1, 3, 4}
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    metrics = evaluate_segm(gt, results)
    assert metrics["AP"] == pytest.approx(100.0) and metrics["AR"] == pytest.approx(100.0)
    assert evaluate_segm(gt, results, max_dets=1000)["AP"] == pytest.approx(100.0)


def test_rle_polygons_and_indexed_masks_agree_with_the_masks():
    masks, classes = gt_masks(0)
    inst = instances_of(masks, classes)
    rle = instances_to_coco_results(inst, 1)
    poly = instances_to_coco_results(inst, 1, fmt="polygons")
    for r, p, m in zip(rle, poly, masks):
        decoded = mask_util.decode({"size": [H, W], "counts": r["segmentation"]["counts"].encode()})
        assert (decoded.astype(bool) == m).all()
        assert r["area"] == m.sum() and r["bbox"] == p["bbox"]
        rles = mask_util.frPyObjects(p["segmentation"], H, W)
        filled = mask_util.decode(mask_util.merge(rles)).astype(bool)
        holes_filled = cv2.floodFill((~m).astype(np.uint8), None, (0, 0), 2)[1] != 2  # m and its holes
        iou = (filled & holes_filled).sum() / (filled | holes_filled).sum()
        assert iou > 0.8  # polygons: outer boundaries, holes dropped (the ring becomes a disc)
    png = indexed_mask_image(inst)
    assert png.dtype == np.uint8 and set(np.unique(png)) == {0, 1, 2, 3}
    assert ((png == 1) == masks[0]).all() and ((png == 3) == masks[2] & ~masks[0] & ~masks[1]).all()


class StubPredictor:
    """Returns image i's ground truth; image i has pixel value i at (0, 0)."""

    def predict_batch(self, images):
        return [{"instances": instances_of(*gt_masks(int(im[0, 0, 0])))} for im in images]


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    for i, name in enumerate(["a.png", "b.png"]):
        im = np.full((H, W, 3), 100, np.uint8)
        im[0, 0] = i
        cv2.imwrite(str(d / name), im)
    (d / "broken.png").write_bytes(b"not a png")
    return d


@pytest.fixture
def predict(monkeypatch):
    module = load_script("tools/predict.py", "solo_predict_tool")
    monkeypatch.setattr(module, "build_predictor", lambda cfg, args: StubPredictor())
    return module


def test_folder_to_results_with_an_unreadable_image_exits_1(predict, folder, tmp_path, capsys):
    gt = write_gt(tmp_path / "gt.json", ["images/a.png", "images/b.png", "images/broken.png"])
    out = tmp_path / "preds.json"
    status = run_main(predict.main, ["--config-file", TINY_CONFIG, "--input", str(folder),
                                     "--output", str(out), "--gt-json", gt, "--masks-dir",
                                     str(tmp_path / "masks"), "--batch-size", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert status == 1
    assert "broken.png" in captured.err and "1 of 3 images could not be read" in captured.err
    results = json.loads(out.read_text())
    assert {r["image_id"] for r in results} == {10, 11}
    assert {r["file_name"].split("/")[-1] for r in results} == {"a.png", "b.png"}
    assert "AP 100.0" in captured.out
    png = cv2.imread(str(tmp_path / "masks" / "b.png"), cv2.IMREAD_UNCHANGED)
    assert png.shape == (H, W) and png.max() == 3
    assert not (tmp_path / "masks" / "broken.png").exists()


@pytest.mark.parametrize("case", ["missing parent", "a folder", "an input", "the gt json"])
def test_output_path_errors_are_clear(predict, folder, tmp_path, capsys, case):
    gt = write_gt(tmp_path / "gt.json", ["a.png", "b.png"])
    output, expected = {
        "missing parent": (str(tmp_path / "nope" / "p.json"), "nope does not exist"),
        "a folder": (str(tmp_path), "a folder; give a file name"),
        "an input": (str(folder / "a.png"), "it would be overwritten"),
        "the gt json": (gt, "it would be overwritten"),
    }[case]
    argv = ["--config-file", TINY_CONFIG, "--input", str(folder / "a.png"), "--output", output,
            "--gt-json", gt]
    assert run_main(predict.main, argv, prog="predict.py", known=(ValueError,)) == 2
    err = capsys.readouterr().err
    assert err.startswith("predict.py: error: --output") and expected in err


def test_input_and_option_errors_exit_2(predict, folder, tmp_path, capsys):
    base = ["--config-file", TINY_CONFIG, "--output", str(tmp_path / "p.json")]
    for argv, expected in [
        (["--input", str(tmp_path / "none*.png")], "no file matches"),
        (["--input", str(folder / "a.png"), "--tile", "big"], "--tile big"),
        (["--input", str(folder / "a.png"), "--tile", "64", "--overlap", "64"], "TEST.TILE.OVERLAP = 64"),
        (["--input", str(folder / "a.png"), "--no-whole-image-pass"], "--no-whole-image-pass needs --tile"),
        (["--input", str(folder / "a.png"), "--gt-json", write_gt(tmp_path / "g.json", ["x.png"])],
         "no image of file name"),
    ]:
        assert run_main(predict.main, base + argv, prog="predict.py", known=(ValueError,)) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_no_whole_image_pass_sets_its_key(predict):
    args = predict.get_parser().parse_args(["--config-file", TINY_CONFIG, "--input", "x.png",
                                            "--output", "p.json", "--tile", "auto",
                                            "--no-whole-image-pass"])
    opts = predict.tile_opts(args)
    assert opts[opts.index("TEST.TILE.WHOLE_IMAGE_PASS") + 1] == "False"
