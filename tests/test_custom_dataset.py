"""Custom COCO-format datasets: train_net.py --train-json/--val-json round trip (non-contiguous
category ids, an image without annotations, a crowd annotation), and clear errors naming the file
for bad input."""
import copy
import json
import os

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

import solo_d2
from helpers import CLASSES, make_image, run_train_net
from solo_d2.data.coco_json import CocoDatasetError, register_custom_coco, register_custom_datasets, validate_coco_json
from solo_d2.data.mapper import FileNamingDatasetMapper, ImageLoadError

CATEGORY_IDS = [3, 7, 11, 20]  # non-contiguous; kind k of make_image -> CATEGORY_IDS[k]
UNUSED_CATEGORY = {"id": 25, "name": "unused", "supercategory": "shape"}
LOW_THRESHOLD_OPTS = ["MODEL.SOLO.SCORE_THRESH_TEST", "0.0", "MODEL.SOLO.MASK_THRESH_TEST", "0.0",
                      "MODEL.SOLO.UPDATE_THRESH_TEST", "0.0", "MODEL.SOLO.MAX_PER_IMAGE", "5"]


def _polygons(mask):
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def write_coco(root, num_images=4, seed=0):
    """4 images of 128x128 and a COCO json: category ids 3/7/11/20 (+ an unused 25), polygons and
    RLE masks, the last image without annotations, one crowd annotation (uncompressed RLE)."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(num_images):
        img, objs = make_image(rng, min_size=24, max_size=64)
        name = f"im{i}.png"
        cv2.imwrite(str(img_dir / name), img)
        image_id = 100 + i
        images.append({"id": image_id, "file_name": name, "height": 128, "width": 128})
        if i == num_images - 1:
            continue  # an image without annotations
        for k, (kind, m) in enumerate(objs):
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORY_IDS[kind],
                   "bbox": [float(v) for v in mask_util.toBbox(rle)], "area": float(m.sum()), "iscrowd": 0}
            polys = _polygons(m)
            if k % 2 == 0 and polys:
                ann["segmentation"] = polys
            else:
                ann["segmentation"] = {"size": [128, 128], "counts": rle["counts"].decode("ascii")}
            annotations.append(ann)
    # One crowd region (uncompressed RLE, as in COCO) on the first image.
    crowd = np.zeros((128, 128), np.uint8)
    crowd[100:120, 5:30] = 1
    flat = crowd.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.r_[0, change, flat.size]).tolist()
    annotations.append({"id": len(annotations) + 1, "image_id": 100, "category_id": 7, "iscrowd": 1,
                        "segmentation": {"size": [128, 128], "counts": counts},
                        "bbox": [5.0, 100.0, 25.0, 20.0], "area": float(crowd.sum())})
    categories = [{"id": c, "name": n, "supercategory": "shape"} for c, n in zip(CATEGORY_IDS, CLASSES)]
    categories = [UNUSED_CATEGORY] + categories[::-1]  # unsorted on purpose
    data = {"images": images, "annotations": annotations, "categories": categories}
    json_path = root / "train.json"
    json_path.write_text(json.dumps(data))
    return json_path, img_dir, data


@pytest.fixture
def coco(tmp_path):
    return write_coco(tmp_path)


def test_validate_a_good_dataset(coco):
    json_path, img_dir, data = coco
    summary = validate_coco_json(str(json_path), str(img_dir), check_images="decode", require_area=True)
    assert summary["num_images"] == 4 and summary["num_images_without_annotations"] == 1
    assert summary["num_crowd"] == 1 and summary["num_annotations"] == len(data["annotations"])
    assert summary["category_ids"] == [3, 7, 11, 20, 25]
    assert summary["thing_classes"] == CLASSES + ["unused"] and summary["num_classes"] == 5


def test_registration_maps_non_contiguous_ids(coco):
    json_path, img_dir, _ = coco
    assert register_custom_coco("test_custom_reg", json_path, img_dir) == 5
    meta = MetadataCatalog.get("test_custom_reg")
    assert meta.thing_classes == CLASSES + ["unused"]
    dicts = DatasetCatalog.get("test_custom_reg")
    assert len(dicts) == 4 and dicts[-1]["annotations"] == []
    cats = {a["category_id"] for d in dicts for a in d["annotations"]}
    assert cats <= {0, 1, 2, 3}
    assert sum(a.get("iscrowd", 0) for d in dicts for a in d["annotations"]) == 1
    # Registering again (same name) replaces the dataset.
    assert register_custom_coco("test_custom_reg", json_path, img_dir) == 5


@pytest.mark.slow
def test_train_net_round_trip_on_a_custom_dataset(coco, tmp_path):
    json_path, img_dir, _ = coco
    out = tmp_path / "out"
    proc = run_train_net(
        ["--train-json", str(json_path), "--train-images", str(img_dir),
         "--val-json", str(json_path), "--val-images", str(img_dir),
         "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", str(out), *LOW_THRESHOLD_OPTS],
        tmp_path,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "Evaluation results for segm" in log
    assert (out / "model_final.pth").is_file()
    cfg = solo_d2.get_solo_cfg(str(out / "config.yaml"))
    assert cfg.MODEL.SOLO.NUM_CLASSES == 5  # from the json's categories (the tiny config has 4)
    assert cfg.DATASETS.TRAIN == ("custom_train",) and cfg.DATASETS.TEST == ("custom_val",)
    results = json.loads((out / "inference" / "custom_val" / "coco_instances_results.json").read_text())
    assert results and {r["category_id"] for r in results} <= {3, 7, 11, 20, 25}  # mapped back


@pytest.mark.slow
def test_train_net_bad_dataset_fails_before_training(coco, tmp_path):
    json_path, img_dir, _ = coco
    os.remove(img_dir / "im2.png")
    proc = run_train_net(["--train-json", str(json_path), "--train-images", str(img_dir),
                       "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(tmp_path / "out")], tmp_path)
    assert proc.returncode != 0
    assert "train_net.py: error: " in proc.stderr and "Traceback" not in proc.stderr
    assert "im2.png" in proc.stderr and "image id 102" in proc.stderr
    assert "Starting training" not in proc.stdout + proc.stderr


def _write(tmp_path, data, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_bad_json_names_the_file(coco, tmp_path):
    _, img_dir, _ = coco
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(CocoDatasetError, match=r"broken\.json: not a valid json"):
        validate_coco_json(str(path), str(img_dir))
    with pytest.raises(CocoDatasetError, match=r"nope\.json: file not found"):
        validate_coco_json(str(tmp_path / "nope.json"), str(img_dir))
    with pytest.raises(CocoDatasetError, match="'categories'"):
        validate_coco_json(_write(tmp_path, {"images": [], "annotations": []}), str(img_dir))


def test_missing_image_names_the_file(coco, tmp_path):
    _, img_dir, data = coco
    data = copy.deepcopy(data)
    data["images"][1]["file_name"] = "gone.png"
    path = _write(tmp_path, data)
    with pytest.raises(CocoDatasetError) as e:
        validate_coco_json(path, str(img_dir))
    assert "bad.json" in str(e.value) and "image id 101" in str(e.value) and "gone.png" in str(e.value)


def test_unreadable_image_names_the_file(coco, tmp_path):
    json_path, img_dir, data = coco
    (img_dir / "im1.png").write_bytes(b"not an image at all")
    with pytest.raises(CocoDatasetError, match=r"image id 101: .*im1\.png: cannot read the image"):
        validate_coco_json(str(json_path), str(img_dir))


def test_truncated_image_is_named_up_front_or_by_the_mapper(coco, tmp_path):
    json_path, img_dir, data = coco
    png = (img_dir / "im0.png").read_bytes()
    (img_dir / "im0.png").write_bytes(png[: len(png) // 2])  # the header still reads
    validate_coco_json(str(json_path), str(img_dir), check_images="header")  # not caught...
    with pytest.raises(CocoDatasetError, match=r"im0\.png: cannot read the image"):
        validate_coco_json(str(json_path), str(img_dir), check_images="decode")  # ...unless decoded
    # During training the mapper names the file.
    from helpers import tiny_cfg

    mapper = FileNamingDatasetMapper(tiny_cfg(), is_train=True)
    register_custom_coco("test_custom_trunc", json_path, img_dir)
    d = DatasetCatalog.get("test_custom_trunc")[0]
    with pytest.raises(ImageLoadError, match=r"im0\.png \(image id 100\)"):
        mapper(d)


def test_image_size_mismatch(coco, tmp_path):
    _, img_dir, data = coco
    data = copy.deepcopy(data)
    data["images"][0]["height"] = 64
    with pytest.raises(CocoDatasetError, match=r"image id 100: .*im0\.png is 128x128 .* json says 128x64"):
        validate_coco_json(_write(tmp_path, data), str(img_dir))


@pytest.mark.parametrize(
    "segmentation, message",
    [
        ([[1.0, 2.0, 3.0, 4.0]], "polygon 0 of 'segmentation' has 4 coordinates"),
        ([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]], "has 7 coordinates"),
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "flat list of numbers"),
        ([], "empty 'segmentation'"),
        ({"size": [64, 64], "counts": "PP0"}, r"RLE 'segmentation' has size \[64, 64\], but the image is \[128, 128\]"),
        ({"size": [128], "counts": "PP0"}, "bad 'size'"),
        ({"size": [128, 128], "counts": [100, 5]}, r"cover 105 pixels"),
        ({"size": [128, 128], "counts": "a b c"}, "compressed RLE 'counts' is malformed"),
        ({"size": [128, 128], "counts": 17}, "must be a string or a list"),
        ("oops", "must be a list of polygons or an RLE dict"),
    ],
)
def test_malformed_segmentation_names_file_and_annotation(coco, tmp_path, segmentation, message):
    _, img_dir, data = coco
    data = copy.deepcopy(data)
    ann = data["annotations"][0]
    ann["segmentation"] = segmentation
    with pytest.raises(CocoDatasetError) as e:
        validate_coco_json(_write(tmp_path, data), str(img_dir))
    text = str(e.value)
    assert "bad.json" in text and f"annotation id {ann['id']} (image id {ann['image_id']})" in text
    assert __import__("re").search(message, text), text


def test_other_annotation_errors(coco, tmp_path):
    _, img_dir, data = coco
    data = copy.deepcopy(data)
    first = data["annotations"][0]
    data["annotations"] += [dict(copy.deepcopy(first), id=1000 + i) for i in range(6)]
    data["annotations"][0]["category_id"] = 4
    data["annotations"][1]["image_id"] = 999
    data["annotations"][2]["id"] = data["annotations"][3]["id"]
    del data["annotations"][4]["segmentation"]
    del data["annotations"][5]["area"]
    with pytest.raises(CocoDatasetError) as e:
        validate_coco_json(_write(tmp_path, data), str(img_dir), require_area=True)
    text = str(e.value)
    assert "category_id 4 is not in 'categories'" in text
    assert "image_id 999 is not in 'images'" in text
    assert "duplicate annotation id" in text
    assert "no 'segmentation'" in text
    assert "missing 'area'" in text


def test_train_and_val_must_have_the_same_categories(coco, tmp_path):
    json_path, img_dir, data = coco
    data = copy.deepcopy(data)
    data["categories"] = data["categories"][1:]  # drop the unused category
    val = _write(tmp_path, data, "val.json")
    with pytest.raises(CocoDatasetError, match="different categories"):
        register_custom_datasets(str(json_path), str(img_dir), val, str(img_dir))
    opts = register_custom_datasets(str(json_path), str(img_dir))
    assert opts == ["DATASETS.TRAIN", "('custom_train',)", "DATASETS.TEST", "()", "MODEL.SOLO.NUM_CLASSES", "5"]
