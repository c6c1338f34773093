"""Tests of the synthetic "shapes" dataset (solo_d2/data/shapes.py). Small sizes: all run in seconds."""
import contextlib
import io
import json
import uuid

import numpy as np
import pytest

from solo_d2.data import (
    SHAPES_CLASSES,
    generate_shapes_dataset,
    register_shapes_datasets,
    render_shapes_image,
)
from solo_d2.data import shapes as shapes_mod

SIZE = (128, 128)


def _coco(json_path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(json_path))


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_classes():
    assert SHAPES_CLASSES == ["circle", "square", "triangle", "star"]


def test_same_seed_is_byte_identical(tmp_path):
    a = generate_shapes_dataset(tmp_path / "a", "train", 8, image_size=SIZE, seed=5,
                                progress=False)
    b = generate_shapes_dataset(tmp_path / "b", "train", 8, image_size=SIZE, seed=5,
                                progress=False)
    assert _read_bytes(a) == _read_bytes(b)
    for i in range(1, 9):
        name = f"{i:06d}.png"
        assert _read_bytes(tmp_path / "a" / "train" / name) == _read_bytes(
            tmp_path / "b" / "train" / name)
    # No temp files are left behind.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["train", "train.json"]
    assert len(list((tmp_path / "a" / "train").iterdir())) == 8


def test_different_seed_differs(tmp_path):
    a = generate_shapes_dataset(tmp_path / "a", "train", 4, image_size=SIZE, seed=0,
                                progress=False)
    b = generate_shapes_dataset(tmp_path / "b", "train", 4, image_size=SIZE, seed=1,
                                progress=False)
    assert _read_bytes(a) != _read_bytes(b)
    assert _read_bytes(tmp_path / "a/train/000001.png") != _read_bytes(
        tmp_path / "b/train/000001.png")


def test_render_masks_are_visible_parts():
    h, w = SIZE
    seen = 0
    for i in range(12):
        image, instances = render_shapes_image(shapes_mod._image_rng(7, i), h, w)
        assert image.shape == (h, w, 3) and image.dtype == np.uint8
        # The background is the first thing drawn from the generator: re-render it.
        background = shapes_mod._render_background(shapes_mod._image_rng(7, i), h, w)
        union = np.zeros((h, w), dtype=np.int32)
        for inst in instances:
            m = inst["mask"]
            assert m.shape == (h, w) and m.dtype == bool
            assert 1 <= inst["category_id"] <= 4
            assert m.sum() >= shapes_mod.MIN_VISIBLE_AREA
            # Objects are flat-coloured: the visible part has one colour.
            assert len(np.unique(image[m], axis=0)) == 1
            union += m
        assert union.max() <= 1, "masks must be pairwise disjoint"
        # Outside the masks nothing was drawn (no instance is dropped with these sizes).
        outside = union == 0
        np.testing.assert_array_equal(image[outside], background[outside])
        seen += len(instances)
    assert seen > 0


def test_occlusion_limit_and_min_area():
    h, w = 64, 64
    for i in range(20):
        rng = shapes_mod._image_rng(3, i)
        _, instances = render_shapes_image(rng, h, w, max_objects=10, min_size=4, max_size=60,
                                           max_occlusion=1.0)
        for inst in instances:
            assert inst["mask"].sum() >= shapes_mod.MIN_VISIBLE_AREA
    # With max_occlusion=0 no object hides another: masks are the full shapes, none dropped.
    for i in range(5):
        _, instances = render_shapes_image(shapes_mod._image_rng(4, i), 128, 128,
                                           max_occlusion=0.0, empty_prob=0.0)
        assert len(instances) >= 1


def test_json_is_valid_coco(tmp_path):
    from pycocotools import mask as mask_util

    path = generate_shapes_dataset(tmp_path, "val", 8, image_size=SIZE, seed=2, progress=False)
    coco = _coco(path)
    assert [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))] == SHAPES_CLASSES
    assert all(c["supercategory"] == "shape" for c in coco.dataset["categories"])
    assert sorted(coco.getImgIds()) == list(range(1, 9))
    for img in coco.dataset["images"]:
        assert (img["height"], img["width"]) == SIZE
        assert (tmp_path / "val" / img["file_name"]).is_file()
    anns = coco.dataset["annotations"]
    assert len(anns) > 0
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    for ann in anns:
        assert isinstance(ann["segmentation"]["counts"], str)
        assert ann["iscrowd"] == 0
        m = coco.annToMask(ann)
        assert m.shape == SIZE
        assert isinstance(ann["area"], int) and ann["area"] == int(m.sum()) > 0
        ys, xs = np.nonzero(m)
        expected = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["bbox"] == [float(v) for v in expected]
        rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
        assert mask_util.toBbox(rle).tolist() == ann["bbox"]
    # Masks of one image are disjoint.
    for img_id in coco.getImgIds():
        ms = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id))]
        if ms:
            assert np.sum(ms, axis=0).max() <= 1


def test_png_matches_render(tmp_path):
    import cv2

    generate_shapes_dataset(tmp_path, "train", 2, image_size=(64, 96), seed=9, progress=False)
    image, _ = render_shapes_image(shapes_mod._image_rng(9, 1), 64, 96)
    png = cv2.imread(str(tmp_path / "train" / "000002.png"), cv2.IMREAD_COLOR)[:, :, ::-1]
    np.testing.assert_array_equal(png, image)


def test_all_categories_and_some_empty(tmp_path):
    path = generate_shapes_dataset(tmp_path / "a", "train", 20, image_size=SIZE, seed=0,
                                   progress=False)
    coco = _coco(path)
    assert {a["category_id"] for a in coco.dataset["annotations"]} == {1, 2, 3, 4}

    path = generate_shapes_dataset(tmp_path / "b", "train", 20, image_size=SIZE, seed=0,
                                   progress=False, empty_prob=0.5)
    coco = _coco(path)
    n_empty = sum(1 for i in coco.getImgIds() if not coco.getAnnIds(imgIds=i))
    assert 0 < n_empty < 20


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_images"):
        generate_shapes_dataset(tmp_path, "train", -1, progress=False)
    with pytest.raises(ValueError, match="image_size"):
        generate_shapes_dataset(tmp_path, "train", 1, image_size=(0, 64), progress=False)
    with pytest.raises(ValueError, match="image_size"):
        generate_shapes_dataset(tmp_path, "train", 1, image_size=(64,), progress=False)
    with pytest.raises(ValueError, match="height and width"):
        render_shapes_image(np.random.default_rng(0), -5, 10)
    assert not (tmp_path / "train.json").exists()


def test_zero_images(tmp_path):
    path = generate_shapes_dataset(tmp_path, "empty", 0, image_size=SIZE, progress=False)
    data = json.loads(_read_bytes(path))
    assert data["images"] == [] and data["annotations"] == []
    assert len(data["categories"]) == 4


def test_register_is_lazy_and_idempotent(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = f"shapes_test_{uuid.uuid4().hex[:8]}"
    splits = {name: dict(split="mini", num_images=3, image_size=(64, 64), seed=4)}
    try:
        assert register_shapes_datasets(root=tmp_path, splits=splits) == [name]
        assert register_shapes_datasets(root=tmp_path, splits=splits) == [name]  # no raise
        assert not (tmp_path / "mini.json").exists(), "registration must not generate data"
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == SHAPES_CLASSES
        assert meta.evaluator_type == "coco"
        assert meta.json_file == str(tmp_path / "mini.json")
        assert meta.image_root == str(tmp_path / "mini")

        dicts = DatasetCatalog.get(name)
        assert (tmp_path / "mini.json").is_file()
        assert len(dicts) == 3
        cats = [a["category_id"] for d in dicts for a in d["annotations"]]
        assert cats and all(0 <= c <= 3 for c in cats)
        for d in dicts:
            assert d["file_name"].startswith(str(tmp_path / "mini"))
            assert (d["height"], d["width"]) == (64, 64)
        assert MetadataCatalog.get(name).thing_classes == SHAPES_CLASSES
        # A second load reuses the files (no complaint about metadata either).
        assert len(DatasetCatalog.get(name)) == 3
    finally:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_default_root(monkeypatch, tmp_path):
    # $SOLO_D2_DATASETS, else ./datasets under the current directory (not the package's folder,
    # which after a normal install is inside site-packages).
    monkeypatch.setenv("SOLO_D2_DATASETS", str(tmp_path))
    assert shapes_mod.default_shapes_root() == tmp_path / "shapes"
    monkeypatch.delenv("SOLO_D2_DATASETS")
    monkeypatch.chdir(tmp_path)
    assert shapes_mod.default_shapes_root() == tmp_path / "datasets" / "shapes"


def _generate_shapes_tool():
    from helpers import load_script

    return load_script("tools/generate_shapes.py")


def test_cli(tmp_path, capsys):
    rc = _generate_shapes_tool().main(["--output", str(tmp_path), "--split", "cli", "--num-images", "3",
                          "--image-size", "48", "64", "--seed", "11", "--no-progress"])
    assert rc == 0
    data = json.loads(_read_bytes(tmp_path / "cli.json"))
    assert len(data["images"]) == 3
    assert all((im["height"], im["width"]) == (48, 64) for im in data["images"])
    assert str(tmp_path / "cli.json") in capsys.readouterr().out


def test_cli_max_occlusion_is_passed_to_the_generator(tmp_path):
    # The tool's json equals the library's for the same max_occlusion, and differs from the
    # default's (more overlap allowed: other placements are kept).
    args = ["--num-images", "6", "--image-size", "96", "96", "--seed", "3", "--max-objects", "12",
            "--min-size", "40", "--max-size", "90", "--empty-prob", "0", "--no-progress"]
    tool = _generate_shapes_tool()
    assert tool.main(["--output", str(tmp_path / "cli"), "--max-occlusion", "0.9"] + args) == 0
    assert tool.main(["--output", str(tmp_path / "cli_default")] + args) == 0
    lib = generate_shapes_dataset(tmp_path / "lib", "train", 6, image_size=(96, 96), seed=3,
                                  progress=False, max_objects=12, min_size=40, max_size=90,
                                  empty_prob=0, max_occlusion=0.9)
    cli = json.loads(_read_bytes(tmp_path / "cli" / "train.json"))
    assert cli == json.loads(_read_bytes(lib))
    assert cli != json.loads(_read_bytes(tmp_path / "cli_default" / "train.json"))
    with pytest.raises(SystemExit) as exc:
        tool.main(["--output", str(tmp_path / "bad"), "--max-occlusion", "1.5"] + args)
    assert exc.value.code == 2


def test_cli_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _generate_shapes_tool().main(["--output", str(tmp_path), "--num-images", "-2", "--no-progress"])
    assert exc.value.code == 2
    assert "num_images" in capsys.readouterr().err
    assert not (tmp_path / "train.json").exists()


def test_default_registration_includes_the_demo_training_split():
    # Registration only: nothing is generated until DatasetCatalog.get.
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from solo_d2.data.shapes import DEFAULT_SPLITS

    assert {"shapes_train", "shapes_val", "shapes_train_large"} <= set(DatasetCatalog.list())
    meta = MetadataCatalog.get("shapes_train_large")
    assert meta.json_file.endswith("train_large.json") and meta.image_root.endswith("train_large")
    assert meta.thing_classes == SHAPES_CLASSES and meta.evaluator_type == "coco"
    # Same seed as shapes_train, so its first 300 images are shapes_train's.
    assert DEFAULT_SPLITS["shapes_train_large"]["seed"] == DEFAULT_SPLITS["shapes_train"]["seed"]
    assert DEFAULT_SPLITS["shapes_train_large"]["num_images"] == 2400
