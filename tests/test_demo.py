"""demo/demo.py draws predictions of a (random) model on images; the shapes demo configs build;
solo_d2.visualize draws ground truth beside predictions."""
import importlib.util
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

import solo_d2
from helpers import REPO, TINY_CONFIG, cpu_env, load_script, make_image, solo_test_cfg
from solo_d2.visualize import setup_demo_cfg, side_by_side, visualize_dataset

SHAPES_CONFIGS = ["configs/Shapes/SOLO_R18_shapes.yaml", "configs/Shapes/DecoupledSOLO_R18_shapes.yaml"]
# Random weights, and thresholds low enough that the random model predicts something.
RANDOM_MODEL_OPTS = ["MODEL.WEIGHTS", "", "MODEL.SOLO.MASK_THRESH_TEST", "0.0", "MODEL.SOLO.MAX_PER_IMAGE", "5"]


@pytest.fixture(autouse=True)
def _random_weights_allowed(monkeypatch):
    """These tests draw a random model: MODEL.WEIGHTS "" needs the opt-out (subprocesses inherit
    it)."""
    monkeypatch.setenv("SOLO_D2_ALLOW_PARTIAL_WEIGHTS", "1")


def _load_demo_module():
    spec = importlib.util.spec_from_file_location("solo_demo", REPO / "demo" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_module():
    return _load_demo_module()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(128, 128), (96, 160)]):
        img, _ = make_image(rng, h=h, w=w, min_size=16, max_size=48)
        path = root / f"img{i}.png"
        cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


def test_demo_writes_a_png_of_the_input_size(demo_module, images, tmp_path):
    out = tmp_path / "vis.png"
    argv = ["--config-file", TINY_CONFIG, "--input", str(images[0]), "--output", str(out),
            "--confidence-threshold", "0", "--opts", *RANDOM_MODEL_OPTS]
    assert demo_module.main(argv) == 0
    vis = cv2.imread(str(out))
    assert vis is not None and vis.shape == (128, 128, 3)
    # Something was drawn: the drawing differs from the input image.
    assert np.abs(vis.astype(int) - cv2.imread(str(images[0])).astype(int)).sum() > 0


def test_demo_glob_to_a_folder(demo_module, images, tmp_path):
    out = tmp_path / "out"
    pattern = str(images[0].parent / "img*.png")
    argv = ["--config-file", TINY_CONFIG, "--input", pattern, "--output", str(out),
            "--confidence-threshold", "0", "--opts", *RANDOM_MODEL_OPTS]
    assert demo_module.main(argv) == 0
    shapes = {p: cv2.imread(str(out / p)).shape for p in sorted(os.listdir(out))}
    assert shapes == {"img0.png": (128, 128, 3), "img1.png": (96, 160, 3)}


def test_demo_names_an_unreadable_input(demo_module, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="not_an_image.png"):
        demo_module.main(["--config-file", TINY_CONFIG, "--input", str(bad), "--output",
                          str(tmp_path / "o.png"), "--opts", *RANDOM_MODEL_OPTS])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        demo_module.main(["--config-file", TINY_CONFIG, "--input", str(tmp_path / "missing.png")])
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        demo_module.main(["--config-file", TINY_CONFIG, "--input", str(tmp_path / "nothing_here*.jpg")])


def test_demo_command_line_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "demo" / "demo.py"), "--config-file", TINY_CONFIG,
         "--input", str(tmp_path / "missing.png")],
        capture_output=True, text=True, timeout=120, env=cpu_env(),
    )
    assert proc.returncode == 2
    assert "missing.png" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_video(demo_module, tmp_path):
    video = tmp_path / "in.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (128, 96))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write mp4v videos")
    rng = np.random.default_rng(1)
    for _ in range(3):
        writer.write(make_image(rng, h=96, w=128)[0])
    writer.release()
    out = tmp_path / "out.mp4"
    argv = ["--config-file", TINY_CONFIG, "--video-input", str(video), "--output", str(out),
            "--confidence-threshold", "0", "--opts", *RANDOM_MODEL_OPTS]
    assert demo_module.main(argv) == 0
    cap = cv2.VideoCapture(str(out))
    frames = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        assert frame.shape == (96, 128, 3)
        frames += 1
    assert frames == 3


def test_confidence_threshold_lowers_the_model_thresholds(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine
    cfg = setup_demo_cfg(TINY_CONFIG, ["MODEL.DEVICE", "cpu"], confidence_threshold=0.02)
    assert cfg.MODEL.SOLO.SCORE_THRESH_TEST == 0.02 and cfg.MODEL.SOLO.UPDATE_THRESH_TEST == 0.02
    cfg = setup_demo_cfg(TINY_CONFIG, [], confidence_threshold=0.9)
    assert cfg.MODEL.SOLO.SCORE_THRESH_TEST == 0.1 and cfg.MODEL.SOLO.UPDATE_THRESH_TEST == 0.05
    assert cfg.MODEL.DEVICE == "cpu"  # the config says cuda; without CUDA it falls back


def test_visualize_dataset_side_by_side(tiny_dataset, tmp_path):
    cfg = setup_demo_cfg(TINY_CONFIG, ["DATASETS.TEST", f"('{tiny_dataset}',)", *RANDOM_MODEL_OPTS], 0.0)
    paths = visualize_dataset(cfg, tiny_dataset, str(tmp_path / "vis"), num_images=2, confidence_threshold=0.0, scale=1.0)
    assert len(paths) == 2
    for p in paths:
        vis = cv2.imread(p)
        assert vis.shape == (128 + 28, 128 * 2 + 8, 3)  # title strip; GT | gap | prediction
    assert side_by_side([np.zeros((4, 5, 3), np.uint8), np.zeros((6, 2, 3), np.uint8)], gap=1).shape == (6, 8, 3)


@pytest.mark.parametrize("path", SHAPES_CONFIGS)
def test_shapes_demo_configs(path):
    cfg = solo_test_cfg(str(REPO / path))
    assert cfg.DATASETS.TRAIN == ("shapes_train_large",) and cfg.DATASETS.TEST == ("shapes_val",)
    assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.MODEL.RESNETS.DEPTH == 18
    assert cfg.MODEL.RESNETS.NORM == "GN" and cfg.MODEL.FPN.NORM == "GN"
    assert cfg.MODEL.SOLO.NUM_CLASSES == len(solo_d2.data.SHAPES_CLASSES)
    assert cfg.SOLVER.CLIP_GRADIENTS_FULL_MODEL_NORM > 0
    assert cfg.DATALOADER.NUM_WORKERS <= 2
    model = build_model(cfg)
    assert type(model.head).__name__ == cfg.MODEL.SOLO.HEAD_TYPE
    # The half-width ResNet-18 (res2..res5: 32..256 channels).
    res = model.backbone.bottom_up
    assert [res._out_feature_channels[f"res{i}"] for i in (2, 3, 4, 5)] == [32, 64, 128, 256]


@pytest.mark.parametrize("path", SHAPES_CONFIGS)
def test_shapes_grid_cells_are_small_enough_for_the_category_branch(path):
    """The category branch reads the FPN feature bilinearly sampled at each cell's centre; the
    cell holding an object's centre must sample a point inside the object, not the background
    beside a small object (measured: with [8, 6, 5, 4, 3] 28% of the objects found got the right
    class, chance 25%; BENCHMARKS.md). An object's centre lies at most half a cell from its cell's centre in x and in y,
    so a disc of the smallest size of the level contains the sample point iff
    cell * sqrt(2) / 2 < size / 2. Level 0 (lower bound 1 px) is exempt."""
    cfg = solo_test_cfg(str(REPO / path))
    side = cfg.INPUT.MIN_SIZE_TEST
    assert cfg.INPUT.MAX_SIZE_TEST == side and cfg.INPUT.MIN_SIZE_TRAIN == (side,)
    for s, (lo, _) in list(zip(cfg.MODEL.SOLO.NUM_GRIDS, cfg.MODEL.SOLO.SCALE_RANGES))[1:]:
        cell = side / s
        assert cell * 2 ** 0.5 < lo, f"grid {s}: {cell:.1f} px cells for objects from {lo} px"


def test_decoupled_shapes_config_differs_only_in_the_head_and_its_prior():
    cfgs = []
    for path in SHAPES_CONFIGS:
        cfgs.append(solo_test_cfg(str(REPO / path)))
    solo, decoupled = cfgs
    assert decoupled.MODEL.SOLO.HEAD_TYPE == "DecoupledSOLOCompactHead" and solo.MODEL.SOLO.HEAD_TYPE == "SOLOHead"
    assert decoupled.MODEL.SOLO.MASK_PRIOR_PROB == 0.1 and solo.MODEL.SOLO.MASK_PRIOR_PROB == 0.0
    decoupled.MODEL.SOLO.HEAD_TYPE = "SOLOHead"
    decoupled.MODEL.SOLO.MASK_PRIOR_PROB = 0.0
    decoupled.OUTPUT_DIR = solo.OUTPUT_DIR
    assert decoupled == solo


def test_ap_breakdown_separates_classification_from_masks(tmp_path, capsys):
    # Two images, one square each; the "model" finds both masks exactly but calls the second
    # square a circle: class-agnostic AP 100; with categories, square has recall 1/2 at
    # precision 1, which COCO's 101-point interpolation scores 51/101 = 50.5 (circle has no GT).
    import pycocotools.mask as mask_util

    tool = load_script("tools/ap_breakdown.py")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode()
    gt = {
        "images": [{"id": i, "width": 32, "height": 32, "file_name": f"{i}.png"} for i in (1, 2)],
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
        "annotations": [
            {"id": i, "image_id": i, "category_id": 2, "segmentation": rle, "area": 256.0,
             "bbox": [8, 8, 16, 16], "iscrowd": 0} for i in (1, 2)
        ],
    }
    results = [{"image_id": 1, "category_id": 2, "segmentation": rle, "score": 0.9},
               {"image_id": 2, "category_id": 1, "segmentation": rle, "score": 0.8}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    assert tool.main([str(tmp_path / "gt.json"), str(tmp_path / "res.json")]) == 0
    out = capsys.readouterr().out
    assert "with categories: AP 50.5" in out
    assert "class-agnostic: AP 100.0" in out
    assert "square: AP 50.5" in out and "circle: AP nan" in out
    assert "classification: 50.0% right class of the 2 / 2 GT objects found" in out
    assert "chance 50.0%" in out


class _WritesMarker:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_visualization_refuses_a_crafted_pickle_and_runs_nothing(tiny_dataset, tmp_path, monkeypatch, suffix):
    # VisualizationDemo (what demo/demo.py runs) and visualize_dataset load weights through
    # SOLOPredictor's safe loader: a weights file whose unpickling would run code is refused.
    import pickle

    from solo_d2.checkpoint import UNSAFE_LOAD_ENV, UnsafeCheckpointError
    from solo_d2.visualize import VisualizationDemo

    monkeypatch.delenv(UNSAFE_LOAD_ENV, raising=False)
    marker = tmp_path / "pwned"
    evil = tmp_path / f"evil{suffix}"
    if suffix == ".pth":
        import torch

        torch.save({"model": {}, "extra": _WritesMarker(marker)}, evil)
    else:
        evil.write_bytes(pickle.dumps({"model": {}, "__author__": _WritesMarker(marker)}))
    cfg = setup_demo_cfg(TINY_CONFIG, ["MODEL.WEIGHTS", str(evil), "DATASETS.TEST", f"('{tiny_dataset}',)"])
    with pytest.raises(UnsafeCheckpointError, match="evil"):
        VisualizationDemo(cfg)
    with pytest.raises(UnsafeCheckpointError, match="evil"):
        visualize_dataset(cfg, tiny_dataset, str(tmp_path / "vis"), num_images=1)
    assert not marker.exists()
