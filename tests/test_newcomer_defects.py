"""Issue 12 (defects found trying solo_d2 as a new user): each case gives a clear error or the
right result, never a wrong result with exit code 0."""
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from helpers import REPO, TINY_CONFIG, load_script, make_image, run_script, tiny_cfg
from solo_d2.checkpoint import (
    PARTIAL_WEIGHTS_ENV,
    CheckpointFileError,
    IncompatibleCheckpointError,
    SafeDetectionCheckpointer,
)
from solo_d2.data.coco_json import CocoDatasetError, register_custom_datasets, validate_coco_json
from solo_d2.data.mapper import FileNamingDatasetMapper
from solo_d2.engine.output_lock import LOCK_NAME, OutputDirBusyError, OutputDirLock
from solo_d2.predictor import SOLOPredictor
from solo_d2.engine import Trainer
from solo_d2.visualize import read_image_bgr

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOW = {
    "MODEL.SOLO.SCORE_THRESH_TEST": 0.0,
    "MODEL.SOLO.MASK_THRESH_TEST": 0.0,
    "MODEL.SOLO.UPDATE_THRESH_TEST": 0.0,
    "MODEL.SOLO.MAX_PER_IMAGE": 5,
}


def _load_script(name, path):
    return load_script(path, name)


@pytest.fixture(scope="module")
def demo_module():
    return _load_script("solo_demo_defects", "demo/demo.py")


@pytest.fixture(autouse=True)
def _no_opt_outs(monkeypatch):
    monkeypatch.delenv(PARTIAL_WEIGHTS_ENV, raising=False)


# ------------------------------------------------------------------ item 2: README / demo default
def _commands(text):
    """Shell commands of the README's code blocks, continuation lines joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def test_demo_default_config_and_readme_command_name_the_model_make_demo_trains(demo_module):
    demo_run = _load_script("solo_demo_run", "tools/demo_run.py")
    trained = demo_run.DEFAULT_CONFIG
    assert trained == "configs/Shapes/DecoupledSOLO_R18_shapes.yaml"
    assert demo_module.get_parser().parse_args(["--webcam"]).config_file == trained
    readme = (REPO / "README.md").read_text()
    uses = [c for c in _commands(readme) if "demo/demo.py" in c and "output/demo/model_final.pth" in c]
    assert uses, "the README shows the demo on the model of make demo"
    for c in uses:
        assert f"--config-file {trained}" in c, c


# ------------------------------------------------------------------ item 3: weights that do not fit
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Checkpoints of the tiny SOLO (4 classes), of Decoupled SOLO, of SOLO with 3 classes, a
    Mask R-CNN-like one (same backbone keys, roi_heads instead of a SOLO head) and one with no
    key of the model."""
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    out = {}
    for name, cfg in [("solo", tiny_cfg()), ("decoupled", tiny_cfg("DecoupledSOLOHead")),
                      ("three_classes", tiny_cfg(**{"MODEL.SOLO.NUM_CLASSES": 3}))]:
        model = Trainer.build_model(cfg)
        out[name] = str(root / f"{name}.pth")
        torch.save({"model": model.state_dict()}, out[name])
        out[name + "_state"] = model.state_dict()
    sd = {k: v for k, v in out["solo_state"].items() if k.startswith("backbone.")}
    sd["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(81, 1024)
    sd["roi_heads.mask_head.predictor.weight"] = torch.zeros(80, 256, 1, 1)
    out["mask_rcnn"] = str(root / "mask_rcnn_like.pth")
    torch.save({"model": sd}, out["mask_rcnn"])
    out["unrelated"] = str(root / "unrelated.pth")
    torch.save({"model": {"fc.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)}}, out["unrelated"])
    return out


def _solo_cfg(weights, **kw):
    return tiny_cfg(**{"MODEL.WEIGHTS": weights, **kw})


@pytest.mark.parametrize(
    "which, expect",
    [
        ("decoupled", r"head parameters missing from it: head\.mask_tower\.0\.weight, .*head\.mask_preds\.0\.weight"),
        ("three_classes", r"head\.cate_pred\.weight \(3,.*\) in the checkpoint vs \(4,"),
        ("mask_rcnn", r"head parameters missing from it: head\."),
        ("unrelated", r"none of its 2 keys is a parameter of this model.*fc\.bias"),
    ],
)
def test_predictor_refuses_weights_that_do_not_fit_the_head(checkpoints, which, expect):
    with pytest.raises(IncompatibleCheckpointError, match=expect) as exc:
        SOLOPredictor(_solo_cfg(checkpoints[which]))
    assert "--allow-partial-weights" in str(exc.value)


def test_predictor_opt_out_and_matching_weights(checkpoints, monkeypatch):
    p = SOLOPredictor(_solo_cfg(checkpoints["solo"]))  # the right weights load
    assert all(torch.equal(v, checkpoints["solo_state"][k]) for k, v in p.model.state_dict().items())
    SOLOPredictor(_solo_cfg(checkpoints["decoupled"]), allow_partial_weights=True)
    monkeypatch.setenv(PARTIAL_WEIGHTS_ENV, "1")
    SOLOPredictor(_solo_cfg(checkpoints["three_classes"]))


def test_empty_weights_are_random_weights_and_refused_for_inference(monkeypatch):
    with pytest.raises(IncompatibleCheckpointError, match="MODEL.WEIGHTS is empty"):
        SOLOPredictor(_solo_cfg(""))
    SOLOPredictor(_solo_cfg(""), allow_partial_weights=True)


def test_visualization_demo_refuses_weights_that_do_not_fit(checkpoints):
    from solo_d2.visualize import VisualizationDemo, setup_demo_cfg

    cfg = setup_demo_cfg(TINY_CONFIG, ["MODEL.WEIGHTS", checkpoints["decoupled"]])
    with pytest.raises(IncompatibleCheckpointError, match="head.mask_preds"):
        VisualizationDemo(cfg)


def _run(args, timeout=300, env=None):
    return run_script(*args, timeout=timeout, env=env)


@pytest.mark.parametrize("which", ["decoupled", "mask_rcnn"])
def test_eval_only_refuses_weights_that_do_not_fit(checkpoints, which, tmp_path):
    proc = _run([str(REPO / "train_net.py"), "--config-file", TINY_CONFIG, "--eval-only",
                 "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", checkpoints[which], "DATASETS.TEST", "('shapes_val',)",
                 "OUTPUT_DIR", str(tmp_path / "eval")], env={"SOLO_D2_DATASETS": str(tmp_path / "datasets")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train_net.py: error: " in proc.stderr
    assert re.search(r"head parameters missing from it: head\.\S+", proc.stderr), proc.stderr[-2000:]


def test_demo_refuses_weights_that_do_not_fit_in_one_line(checkpoints, tmp_path):
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), make_image(np.random.default_rng(0))[0])
    proc = _run([str(REPO / "demo" / "demo.py"), "--config-file", TINY_CONFIG, "--input", str(img),
                 "--output", str(tmp_path / "o.png"), "--opts", "MODEL.WEIGHTS",
                 checkpoints["three_classes"]])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "head.cate_pred.weight" in proc.stderr and "--allow-partial-weights" in proc.stderr


def test_fine_tuning_keeps_a_warning_naming_the_reinitialised_head(checkpoints, tiny_dataset, tmp_path):
    cfg = tiny_cfg(**{"MODEL.WEIGHTS": checkpoints["three_classes"],
                      "DATASETS.TRAIN": f"('{tiny_dataset}',)", "OUTPUT_DIR": str(tmp_path)})
    trainer = Trainer(cfg)
    import io

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    trainer.checkpointer.logger.addHandler(handler)
    try:
        trainer.resume_or_load(resume=False)
    finally:
        trainer.checkpointer.logger.removeHandler(handler)
    log = stream.getvalue()
    assert "Training from a checkpoint that does not fully fit the model" in log
    assert "keep their initial values" in log and "head.cate_pred.weight" in log
    backbone_key = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(trainer.model.state_dict()[backbone_key], checkpoints["three_classes_state"][backbone_key])


# ------------------------------------------------------------------ item 4: 16-bit images
@pytest.fixture(scope="module")
def images16(tmp_path_factory):
    root = tmp_path_factory.mktemp("img16")
    gray = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)  # 0..64491
    bgr = np.stack([gray, gray // 2, 65535 - gray], axis=-1).astype(np.uint16)
    cv2.imwrite(str(root / "gray16.png"), gray)
    cv2.imwrite(str(root / "bgr16.png"), bgr)
    assert cv2.imread(str(root / "gray16.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    return root, gray, bgr


def test_16bit_pngs_are_scaled_not_white_in_the_demo_and_the_mapper(images16):
    root, gray, bgr = images16
    expect_gray = np.rint(gray / 257.0)
    img = read_image_bgr(str(root / "gray16.png"))
    assert img.dtype == np.uint8 and img.shape == (48, 64, 3)
    assert np.abs(img.astype(float) - expect_gray[:, :, None]).max() <= 0.5
    img = read_image_bgr(str(root / "bgr16.png"))
    assert np.abs(img.astype(float) - bgr / 257.0).max() <= 1.0  # PIL keeps the high byte
    cfg = tiny_cfg()
    mapper = FileNamingDatasetMapper(cfg, False)
    out = mapper({"file_name": str(root / "gray16.png"), "image_id": 0, "height": 48, "width": 64})
    t = out["image"]  # resized to 128 short side; compare means (white would be 255)
    assert t.dtype == torch.uint8 and abs(float(t.float().mean()) - expect_gray.mean()) < 2.0


# ------------------------------------------------------------------ item 5: --train-json alone
def _coco(root, anns=None, categories=None, images=None, size=(128, 128)):
    root.mkdir(parents=True, exist_ok=True)
    h, w = size
    if images is None:
        cv2.imwrite(str(root / "a.png"), np.full((h, w, 3), 90, np.uint8))
        images = [{"id": 1, "file_name": "a.png", "height": h, "width": w}]
    m = np.zeros((h, w), np.uint8)
    m[10:40, 20:60] = 1
    good = {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 1200.0,
            "bbox": [20.0, 10.0, 40.0, 30.0], "segmentation": [[20, 10, 60, 10, 60, 40, 20, 40]]}
    data = {"images": images, "annotations": [good] + list(anns or []),
            "categories": categories or [{"id": 1, "name": "thing"}]}
    path = root / "data.json"
    path.write_text(json.dumps(data))
    return path


def test_train_json_without_val_json_skips_evaluation(tmp_path, caplog):
    path = _coco(tmp_path / "d")
    with caplog.at_level(logging.WARNING, logger="solo_d2.data.coco_json"):
        opts = register_custom_datasets(train_json=str(path))
    assert "evaluation is skipped" in caplog.text
    cfg = tiny_cfg(**{"DATASETS.TEST": "('shapes_val',)"})
    cfg.merge_from_list(opts)
    assert cfg.DATASETS.TRAIN == ("custom_train",) and cfg.DATASETS.TEST == ()
    # The trainer's test (final evaluation, EVAL_PERIOD) does nothing on an empty TEST.
    assert Trainer.test(cfg, Trainer.build_model(cfg)) == {}


# ------------------------------------------------------------------ item 6: zero-pixel masks
def test_annotations_that_rasterise_to_zero_pixels_are_reported(tmp_path):
    empty_rle = mask_util.encode(np.zeros((128, 128), np.uint8, order="F"))
    empty_rle["counts"] = empty_rle["counts"].decode("ascii")
    bad = [
        {"id": 2, "segmentation": [[10, 10, 20, 20, 30, 30]], "bbox": [10, 10, 20, 20]},  # collinear
        {"id": 3, "segmentation": [[50.1, 50.1, 50.3, 50.1, 50.3, 50.3]], "bbox": [50.1, 50.1, 0.2, 0.2]},
        {"id": 4, "segmentation": empty_rle, "bbox": [0, 0, 1, 1]},
        {"id": 5, "segmentation": {"size": [128, 128], "counts": [128 * 128]}, "bbox": [0, 0, 1, 1]},
        {"id": 6, "segmentation": [[70, 70, 90, 70, 90, 90, 70, 90]], "bbox": [70, 70, 0, 20]},
    ]
    for a in bad:
        a.update(image_id=1, category_id=1, iscrowd=0, area=1.0)
    path = _coco(tmp_path / "d", anns=bad)
    with pytest.raises(CocoDatasetError) as exc:
        validate_coco_json(str(path), str(tmp_path / "d"))
    msg = str(exc.value)
    assert str(path) in msg and "5 problems" in msg
    for aid in (2, 3, 4, 5):
        assert re.search(rf"annotation id {aid} \(image id 1\): the 'segmentation' covers 0 pixels", msg), msg
    assert re.search(r"annotation id 6 \(image id 1\): 'bbox' .* zero width or height but the mask has 400", msg)
    # What training sees: Detectron2's rasteriser gives 0 pixels for these polygons too.
    from detectron2.structures.masks import polygons_to_bitmask

    for a in bad[:2]:
        assert polygons_to_bitmask([np.array(p) for p in a["segmentation"]], 128, 128).sum() == 0


# ------------------------------------------------------------------ item 8: batch composition
def test_batched_inference_equals_single_image_inference():
    # Untrained model: mask probabilities are ~0.0099 +- 0.001, so this threshold gives partial
    # masks (between 2% and 100% of the image) whose pixels depend on the grid and the features.
    torch.manual_seed(0)
    model = Trainer.build_model(tiny_cfg(**{**LOW, "MODEL.SOLO.MASK_THRESH_TEST": 0.0099})).eval()
    rng = np.random.default_rng(0)
    sizes = [(128, 96), (96, 128), (128, 128), (64, 100), (128, 96)]
    inputs = []
    for h, w in sizes:
        img = make_image(rng, h=h, w=w, min_size=16, max_size=48)[0]
        inputs.append({"image": torch.as_tensor(img.transpose(2, 0, 1).copy()), "height": h, "width": w})
    with torch.no_grad():
        single = [model([x])[0]["instances"] for x in inputs]
        batched = [r["instances"] for r in model(inputs)]
        # The former joint pass on the batch's 128x128 canvas: other masks (what was fixed).
        images = model.preprocess_image(inputs)
        features = model.run_backbone(images.tensor)
        cate, masks = model.head([features[f] for f in model.in_features])
        joint = [r["instances"] for r in model.inference_from_outputs(cate, masks, images, inputs)]
    assert not torch.equal(joint[0].pred_masks, single[0].pred_masks)
    fill = torch.cat([a.pred_masks.float().mean((1, 2)) for a in single])
    assert ((fill > 0.05) & (fill < 0.95)).any()  # non-trivial masks
    for a, b, (h, w) in zip(single, batched, sizes):
        assert len(a) > 0 and b.image_size == (h, w) and len(a) == len(b)
        torch.testing.assert_close(b.scores, a.scores, rtol=0, atol=1e-5)
        assert torch.equal(b.pred_classes, a.pred_classes)
        assert torch.equal(b.pred_masks, a.pred_masks)


# ------------------------------------------------------------------ item 9: one run per OUTPUT_DIR
_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from solo_d2.engine.output_lock import OutputDirLock
with OutputDirLock({out!r}):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_run_in_one_output_dir_fails_fast_naming_dir_and_pid(tmp_path):
    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER.format(repo=str(REPO), out=out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirBusyError, match=rf"{re.escape(out)} is in use .*pid {holder.pid}"):
            OutputDirLock(out).acquire()
        start = time.time()
        proc = _run([str(REPO / "train_net.py"), "--config-file", TINY_CONFIG, "MODEL.DEVICE", "cpu",
                     "OUTPUT_DIR", out, "DATASETS.TRAIN", "('shapes_train',)"])
        assert proc.returncode != 0 and time.time() - start < 120
        assert f"pid {holder.pid}" in proc.stderr and out in proc.stderr
        assert not os.path.exists(os.path.join(out, "config.yaml"))  # refused before writing
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over_and_released(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with OutputDirLock(str(out)):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()


# ------------------------------------------------------------------ item 10: clear errors
def test_exif_rotated_image_with_the_stored_size_says_so(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (128, 96), (90, 90, 90)).save(root / "rot.jpg", exif=exif.tobytes())
    images = [{"id": 1, "file_name": "rot.jpg", "height": 96, "width": 128}]  # stored size
    path = _coco(root, images=images, size=(96, 128))
    with pytest.raises(CocoDatasetError, match=r'EXIF-rotated \(orientation tag 6\).*"width": 96, "height": 128'):
        validate_coco_json(str(path), str(root))


def test_empty_truncated_and_directory_weights_name_the_file(checkpoints, tmp_path):
    model = Trainer.build_model(tiny_cfg())
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointFileError, match=r"empty\.pth' is an empty file"):
        SafeDetectionCheckpointer(model).load(str(empty))
    truncated = tmp_path / "truncated.pth"
    data = open(checkpoints["solo"], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFileError, match=r"truncated\.pth' cannot be read: the file is truncated"):
        SafeDetectionCheckpointer(model).load(str(truncated))
    with pytest.raises(CheckpointFileError, match=r"is a directory, not a checkpoint file"):
        SafeDetectionCheckpointer(model).load(str(tmp_path))


@pytest.mark.parametrize("suffix", ["", "/"])
def test_demo_output_into_a_new_folder(demo_module, tmp_path, suffix):
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), make_image(np.random.default_rng(0))[0])
    out = str(tmp_path / "new" / "dir") + suffix
    argv = ["--config-file", TINY_CONFIG, "--input", str(img), "--output", out,
            "--allow-partial-weights", "--opts", "MODEL.WEIGHTS", ""]
    assert demo_module.main(argv) == 0
    assert cv2.imread(str(tmp_path / "new" / "dir" / "a.png")).shape == (128, 128, 3)


def test_demo_video_into_a_missing_folder_names_it(demo_module, tmp_path):
    video = tmp_path / "in.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (64, 48))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write mp4v videos")
    writer.write(np.zeros((48, 64, 3), np.uint8))
    writer.release()
    missing = tmp_path / "no" / "such"
    argv = ["--config-file", TINY_CONFIG, "--video-input", str(video), "--output",
            str(missing / "out.mp4"), "--allow-partial-weights", "--opts", "MODEL.WEIGHTS", ""]
    with pytest.raises(FileNotFoundError, match=rf"folder {re.escape(str(missing))} does not exist"):
        demo_module.main(argv)


def test_demo_window_modes_under_headless_opencv_fail_in_one_line(demo_module, tmp_path, monkeypatch):
    monkeypatch.setattr(cv2, "getBuildInformation", lambda: "  GUI:    GTK3\n    GTK+: YES\n")
    assert demo_module.opencv_has_gui()
    monkeypatch.setattr(cv2, "getBuildInformation", lambda: "  GUI:                NONE\n    VTK: NO\n")
    assert not demo_module.opencv_has_gui()
    monkeypatch.undo()
    if demo_module.opencv_has_gui():
        pytest.skip("this OpenCV has a GUI: the window modes work")
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), make_image(np.random.default_rng(0))[0])
    for args in (["--input", str(img)], ["--webcam"]):
        proc = _run([str(REPO / "demo" / "demo.py"), "--config-file", TINY_CONFIG, *args], timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        err = proc.stderr.strip().splitlines()[-1]
        assert "no GUI support" in err and "--output" in err and ".[gui]" in err


def test_duplicate_category_names_are_reported(tmp_path):
    cats = [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}, {"id": 5, "name": "thing"}]
    path = _coco(tmp_path / "d", categories=cats)
    with pytest.raises(CocoDatasetError, match=r"duplicate category name 'thing' \(category ids \[1, 5\]\)"):
        validate_coco_json(str(path), str(tmp_path / "d"))


def test_validator_accepts_16bit_and_refuses_float_images(tmp_path, images16):
    root = tmp_path / "d"
    root.mkdir()
    src, _, _ = images16
    (root / "g.png").write_bytes((src / "gray16.png").read_bytes())
    Image.fromarray(np.zeros((48, 64), np.float32), mode="F").save(root / "f.tif")
    images = [{"id": 1, "file_name": "g.png", "height": 48, "width": 64},
              {"id": 2, "file_name": "f.tif", "height": 48, "width": 64}]
    path = _coco(root, images=images, size=(48, 64))
    with pytest.raises(CocoDatasetError, match=r"image id 2: .*f\.tif: a floating-point image") as exc:
        validate_coco_json(str(path), str(root))
    assert "g.png" not in str(exc.value)


def test_train_net_with_train_json_only_does_not_evaluate_on_the_configs_test_set(tmp_path):
    path = _coco(tmp_path / "d")
    config = tmp_path / "with_shapes_val.yaml"
    config.write_text(f'_BASE_: "{TINY_CONFIG}"\nDATASETS:\n  TEST: ("shapes_val",)\n')
    datasets = tmp_path / "datasets"
    proc = _run([str(REPO / "train_net.py"), "--config-file", str(config), "--train-json", str(path),
                 "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "1",
                 "TEST.EVAL_PERIOD", "1", "OUTPUT_DIR", str(tmp_path / "out")],
                env={"SOLO_D2_DATASETS": str(datasets)})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "evaluation is skipped" in log and "Evaluation results" not in log
    assert not (datasets / "shapes").exists()  # the built-in dataset was not generated


# ================================================================== issue 30 (round 2)
from solo_d2.utils.cli import ConfigError, UserError, plan_outputs, run_main  # noqa: E402


def _png(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), make_image(np.random.default_rng(seed))[0])
    return path


@pytest.fixture
def images(tmp_path):
    """imgs/a.png, imgs/b.png, x/img.png, y/img.png and their bytes."""
    paths = [_png(tmp_path / p, i) for i, p in enumerate(["imgs/a.png", "imgs/b.png", "x/img.png", "y/img.png"])]
    return tmp_path, {p: p.read_bytes() for p in paths}


def _unchanged(files):
    return all(p.read_bytes() == b for p, b in files.items())


# ------------------------------------------------------------------ item 1: demos never overwrite
def test_plan_outputs_refuses_inputs_and_keeps_equal_names_apart(images):
    root, files = images
    imgs = [str(root / "imgs/a.png"), str(root / "imgs/b.png")]
    for output in (str(root / "imgs"), str(root / "imgs") + "/", str(root / "imgs/a.png")):
        with pytest.raises(UserError, match=r"would write over the input .*imgs/a\.png"):
            plan_outputs(imgs[:1] if output.endswith(".png") else imgs, output, ext=".png")
    pairs = plan_outputs([str(root / "x/img.png"), str(root / "y/img.png")], str(root / "out"), ext=".png")
    assert [os.path.basename(o) for _, o in pairs] == ["x_img.png", "y_img.png"]
    # The same file through two patterns is drawn once.
    assert len(plan_outputs([imgs[0], str(root / "imgs/../imgs/a.png")], str(root / "out"))) == 1
    assert _unchanged(files)


def test_demo_refuses_to_write_over_its_inputs_and_keeps_equal_names_apart(demo_module, images):
    root, files = images
    opts = ["--allow-partial-weights", "--opts", "MODEL.WEIGHTS", ""]
    for inputs, output in (([str(root / "imgs/*.png")], str(root / "imgs") + "/"),
                           ([str(root / "imgs/a.png")], str(root / "imgs/a.png"))):
        with pytest.raises(UserError, match=r"would write over the input .*imgs/a\.png"):
            demo_module.main(["--config-file", TINY_CONFIG, "--input", *inputs, "--output", output, *opts])
    assert _unchanged(files)
    out = root / "out"
    assert demo_module.main(["--config-file", TINY_CONFIG, "--input", str(root / "x/img.png"),
                             str(root / "y/img.png"), "--output", str(out), *opts]) == 0
    assert sorted(os.listdir(out)) == ["x_img.png", "y_img.png"]
    with pytest.raises(UserError, match=r"a folder: use '.*imgs/\*\.png'"):
        demo_module.main(["--config-file", TINY_CONFIG, "--input", str(root / "imgs"), "--output", str(out), *opts])


class _NoDetections:
    class_names = []

    def __call__(self, bgr):
        h, w = bgr.shape[:2]
        return {"masks": np.zeros((0, h, w), bool), "scores": np.zeros(0, np.float32),
                "classes": np.zeros(0, np.int64), "boxes": np.zeros((0, 4), np.float32)}


@pytest.fixture
def onnx_demo(monkeypatch):
    module = _load_script("solo_onnx_demo_defects", "demo/onnx_demo.py")
    monkeypatch.setattr(module, "ONNXSOLO", lambda path, threads=0: _NoDetections())
    return module


def test_onnx_demo_refuses_to_write_over_its_inputs_and_keeps_equal_names_apart(onnx_demo, images):
    root, files = images
    for inputs, output in (([str(root / "imgs/*.png")], str(root / "imgs")),
                           ([str(root / "imgs/a.png")], str(root / "imgs/a.png"))):
        with pytest.raises(onnx_demo.UserError, match=r"would write over the input .*imgs/a\.png"):
            onnx_demo.main(["--model", "m.onnx", "--input", *inputs, "--output", output])
    assert _unchanged(files)
    onnx_demo.main(["--model", "m.onnx", "--input", str(root / "x/img.png"), str(root / "y/img.png"),
                    "--output", str(root / "out")])
    assert sorted(os.listdir(root / "out")) == ["x_img.png", "y_img.png"]
    with pytest.raises(onnx_demo.UserError, match=r"a folder: use"):
        onnx_demo.main(["--model", "m.onnx", "--input", str(root / "imgs"), "--output", str(root / "o")])
    (root / "file").write_text("")
    with pytest.raises(onnx_demo.UserError, match=r"cannot write"):
        onnx_demo.main(["--model", "m.onnx", "--input", str(root / "imgs/a.png"), "--output",
                        str(root / "file" / "o.png")])


# ------------------------------------------------------------------ item 8: one-line errors
def test_run_main_prints_a_known_error_in_one_line_and_exits_2(capsys, monkeypatch):
    monkeypatch.delenv("SOLO_D2_DEBUG", raising=False)

    def fails(exc):
        def main(argv):
            raise exc
        return main

    for exc, text in ((UserError("bad thing"), "bad thing"), (FileNotFoundError("x.png: no such file"), "x.png"),
                      (KeyError("Non-existent config key: MODEL.FOO"), "Non-existent config key: MODEL.FOO"),
                      (AssertionError("Override list has odd length: ['A']"), "odd length")):
        assert run_main(fails(exc), [], prog="tool") == 2
        err = capsys.readouterr().err
        assert err == f"tool: error: {text}\n" if text == "bad thing" else text in err and len(err.splitlines()) == 1
    with pytest.raises(UserError):  # --debug: the traceback
        run_main(fails(UserError("bad")), ["--debug"], prog="tool")
    monkeypatch.setenv("SOLO_D2_DEBUG", "1")
    with pytest.raises(UserError):
        run_main(fails(UserError("bad")), [], prog="tool")
    monkeypatch.delenv("SOLO_D2_DEBUG")
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_main(fails(ZeroDivisionError()), [], prog="tool")


def test_config_typos_and_missing_files_name_the_file_and_key(tmp_path):
    from solo_d2 import get_solo_cfg

    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{TINY_CONFIG}"\nMODEL:\n  SOLO:\n    NUM_CLASES: 3\n')
    with pytest.raises(ConfigError, match=r"bad\.yaml'?: Non-existent config key: MODEL\.SOLO\.NUM_CLASES"):
        get_solo_cfg(str(bad))
    with pytest.raises(ConfigError, match=r"Non-existent key: MODEL\.SOLO\.NUM_CLASES"):
        get_solo_cfg(TINY_CONFIG, ["MODEL.SOLO.NUM_CLASES", "3"])
    with pytest.raises(ConfigError, match=r"odd length"):
        get_solo_cfg(TINY_CONFIG, ["MODEL.SOLO.NUM_CLASSES"])
    with pytest.raises(ConfigError, match=r"nope\.yaml'?: no such file"):
        get_solo_cfg(str(tmp_path / "nope.yaml"))


def test_train_net_refuses_an_empty_test_set_for_eval_only_and_an_empty_train_set():
    import argparse

    train_net = _load_script("solo_train_net_defects", "train_net.py")
    args = argparse.Namespace(config_file=TINY_CONFIG, eval_only=True, opts=["DATASETS.TEST", "()"])
    with pytest.raises(UserError, match=r"--eval-only: DATASETS.TEST is empty.*--val-json"):
        train_net._checked_cfg(args, [])
    args = argparse.Namespace(config_file=TINY_CONFIG, eval_only=False, opts=["DATASETS.TRAIN", "()"])
    with pytest.raises(UserError, match=r"DATASETS.TRAIN is empty.*--train-json"):
        train_net._checked_cfg(args, [])
    args.opts = ["DATASETS.TRAIN", "('shapes_train',)"]
    assert train_net._checked_cfg(args, []).DATASETS.TRAIN == ("shapes_train",)


@pytest.mark.slow
def test_tools_print_one_line_and_exit_2(tmp_path):
    """The command lines (few: each starts Python): train_net --eval-only with an empty
    DATASETS.TEST (item 7) and with no training set, a config typo in the demo (and its
    traceback under --debug), a non-JSON file given to the dataset analysis."""
    env = {"SOLO_D2_DATASETS": str(tmp_path / "datasets"), "OMP_NUM_THREADS": "1"}
    train = [str(REPO / "train_net.py"), "--config-file", TINY_CONFIG, "MODEL.DEVICE", "cpu",
             "OUTPUT_DIR", str(tmp_path / "out")]
    cases = [
        (train[:3] + ["--eval-only"] + train[3:] + ["DATASETS.TEST", "()"],
         ["DATASETS.TEST is empty", "--val-json"]),
        (train + ["DATASETS.TRAIN", "()"], ["DATASETS.TRAIN is empty", "--train-json"]),
        ([str(REPO / "demo" / "demo.py"), "--config-file", TINY_CONFIG, "--input", str(_png(tmp_path / "a.png")),
          "--output", str(tmp_path / "o"), "--opts", "MODEL.SOLO.NUM_CLASES", "3"], ["Non-existent key: MODEL.SOLO.NUM_CLASES"]),
    ]
    (tmp_path / "a.json").write_text("not json")
    cases.append(([str(REPO / "tools" / "analyze_dataset.py"), "--config-file", TINY_CONFIG, "--json",
                   str(tmp_path / "a.json"), "--output", str(tmp_path / "an")], ["a.json: not a valid json file"]))
    for args, expect in cases:
        proc = _run(args, timeout=120, env=env)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert all(e in err[-1] for e in expect) and ": error: " in err[-1], err[-3:]
    assert not (tmp_path / "out" / "inference").exists()
    proc = _run(cases[2][0][:1] + ["--debug"] + cases[2][0][1:], timeout=120, env=env)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


# ------------------------------------------------------------------ item 2: analysis = training's checks
def _dup_json(root):
    ann = {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 1200.0,
           "bbox": [20.0, 10.0, 40.0, 30.0], "segmentation": [[20, 10, 60, 10, 60, 40, 20, 40]]}
    return _coco(root, anns=[ann])  # annotation 1 is the same square


def test_duplicated_annotations_are_reported_by_the_validator(tmp_path):
    path = _dup_json(tmp_path / "d")
    with pytest.raises(CocoDatasetError, match=r"annotation ids \[1, 2\] \(image id 1\): the same mask 2 times"):
        validate_coco_json(str(path), str(tmp_path / "d"))


def test_analyze_dataset_validates_the_json_as_training_does(tmp_path):
    tool = _load_script("solo_analyze_defects", "tools/analyze_dataset.py")
    path = _dup_json(tmp_path / "d")
    argv = ["--config-file", TINY_CONFIG, "--json", str(path), "--suggest", "--output", str(tmp_path / "o")]
    with pytest.raises(CocoDatasetError, match=r"annotation ids \[1, 2\]"):
        tool.main(argv)
    os.remove(tmp_path / "d" / "a.png")  # what register_custom_datasets refuses too
    with pytest.raises(CocoDatasetError, match=r"image id 1: .*a\.png: file not found"):
        tool.main(argv)


def test_a_suggestion_that_does_not_reduce_the_losses_is_not_written(tmp_path, capsys):
    from solo_d2.analysis.grid_coverage import object_geometry
    from solo_d2.analysis.grid_suggestion import suggest_grids
    from detectron2.structures import BoxMode

    sq = {"bbox": [100, 100, 30, 30], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "iscrowd": 0,
          "segmentation": [[100, 100, 130, 100, 130, 130, 100, 130]]}
    dicts = [{"file_name": "0.png", "image_id": 0, "height": 256, "width": 256,
              "annotations": [dict(sq), dict(sq), {**sq, "bbox": [10, 10, 30, 30],
                                                   "segmentation": [[10, 10, 40, 10, 40, 40, 10, 40]]}]}]
    cfg = tiny_cfg()
    sug = suggest_grids(cfg, object_geometry(dicts))
    assert not sug.improved and sug.before.cause2 > 0
    assert sug.num_grids == list(cfg.MODEL.SOLO.NUM_GRIDS) and sug.input_scale == 1.0
    assert "do not reduce the losses" in sug.reasons[0]
    assert any("1 objects have the centre and box of another object" in r for r in sug.reasons), sug.reasons
    # The tool says so and writes nothing (a json of that dataset: the validator would refuse the
    # duplicate, so the tool is given the dataset through a registered name).
    from detectron2.data import DatasetCatalog

    name = "solo_test_issue30_duplicates"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    tool = _load_script("solo_analyze_defects2", "tools/analyze_dataset.py")
    out = tmp_path / "sug.yaml"
    assert tool.main(["--config-file", TINY_CONFIG, "--dataset", name, "--suggest", "--write-config", str(out),
                      "--output", str(tmp_path / "o")]) == 1
    captured = capsys.readouterr()
    assert "do not reduce the losses" in captured.out and f"{out} not written" in captured.err
    assert not out.exists()


# ------------------------------------------------------------------ item 9: minor
def test_predictor_warns_on_implausible_value_ranges():
    from solo_d2.predictor import as_hwc3

    with pytest.warns(UserWarning, match="0..1"):
        as_hwc3(np.full((8, 8, 3), 0.5, np.float32))
    with pytest.warns(UserWarning, match="uint16 array whose values are all in 0..200"):
        as_hwc3(np.full((8, 8, 3), 200, np.uint16))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_hwc3(np.full((8, 8, 3), 200.0, np.float32))
        as_hwc3(np.full((8, 8, 3), 60000, np.uint16))
        as_hwc3(np.zeros((8, 8, 3), np.float32))


def test_onnx_demo_resizes_up_to_the_exported_minimum():
    module = _load_script("solo_onnx_demo_sizes", "demo/onnx_demo.py")
    model = object.__new__(module.ONNXSOLO)
    model.static_size, model.min_size, model.max_size, model.min_input_size = None, 128, 213, 65
    model.input_format = "BGR"
    assert model.input_size(128, 128) == ((128, 128), None)
    size, warning = model.input_size(20, 400)  # -> 11 x 213: below 65
    assert min(size) >= 65 and "below the exported model's minimum side 65" in warning
    assert model.prepare(np.zeros((20, 400, 3), np.uint8)).shape[1:] == size


def test_onnx_demo_non_onnx_model_is_one_clear_error(tmp_path):
    pytest.importorskip("onnxruntime")
    module = _load_script("solo_onnx_demo_model", "demo/onnx_demo.py")
    (tmp_path / "model.onnx").write_text("not a model")
    with pytest.raises(module.UserError, match=r"model\.onnx: not an ONNX model"):
        module.ONNXSOLO(str(tmp_path / "model.onnx"))


def test_export_tool_output_file_thin_sample_and_copypaste_summary(tmp_path):
    tool = _load_script("solo_export_defects", "tools/deploy/export_model.py")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"--output .*file: a file"):
        tool.main(["--config-file", TINY_CONFIG, "--format", "onnx", "--output", str(tmp_path / "file")])
    cv2.imwrite(str(tmp_path / "thin.png"), np.zeros((4, 600, 3), np.uint8))
    with pytest.raises(UserError, match=r"--sample-image .*thin\.png: its 600x4 pixels resize .* outside the \[65,"):
        tool.main(["--config-file", TINY_CONFIG, "--format", "onnx", "--output", str(tmp_path / "o"),
                   "--sample-image", str(tmp_path / "thin.png"), "--allow-partial-weights", "MODEL.WEIGHTS", ""])
    code = (f"import sys, importlib.util; sys.path.insert(0, {str(REPO)!r})\n"
            f"spec = importlib.util.spec_from_file_location('t', {str(REPO / 'tools/deploy/export_model.py')!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m.setup_logging()\n"
            "from detectron2.evaluation import print_csv_format\nprint_csv_format({'segm': {'AP': 1.0}})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "copypaste: Task: segm" in proc.stdout + proc.stderr, proc.stderr[-2000:]


def test_gui_hint_is_the_documented_install_command(demo_module):
    readme = " ".join((REPO / "docs" / "reliability.md").read_text().split())
    for cmd in ("pip install -e '.[gui]'",
                "pip uninstall -y opencv-python-headless && pip install --force-reinstall 'opencv-python<4.11'"):
        assert f"`{cmd}`" in readme and cmd in demo_module.GUI_INSTALL
