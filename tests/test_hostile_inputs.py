"""Hostile and odd inputs: each one either works (masks of the requested size) or fails with a
clear TypeError / ValueError naming the input, never an unrelated traceback or wrong-size masks."""
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from helpers import CLASSES, instances, tiny_cfg, write_dataset
from solo_d2.data.mapper import ImageLoadError
from solo_d2.predictor import SOLOPredictor
from solo_d2.engine import Trainer

# An untrained model predicts nothing at the default thresholds; these make it predict.
LOW = {
    "MODEL.SOLO.SCORE_THRESH_TEST": 0.0,
    "MODEL.SOLO.MASK_THRESH_TEST": 0.0,
    "MODEL.SOLO.UPDATE_THRESH_TEST": 0.0,
    "MODEL.SOLO.MAX_PER_IMAGE": 3,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return SOLOPredictor(tiny_cfg(**LOW), allow_partial_weights=True)  # MODEL.WEIGHTS "": random


def _rng():
    return np.random.default_rng(0)


def _check_output(out, h, w):
    inst = out["instances"]
    assert inst.image_size == (h, w)
    assert len(inst) > 0  # low thresholds: the untrained model predicts something
    assert inst.pred_masks.dtype == torch.bool and tuple(inst.pred_masks.shape) == (len(inst), h, w)
    assert torch.isfinite(inst.scores).all()


@pytest.mark.parametrize(
    "name,image",
    [
        ("grayscale HxW", _rng().integers(0, 256, (48, 64), dtype=np.uint8)),
        ("grayscale HxWx1", _rng().integers(0, 256, (48, 64, 1), dtype=np.uint8)),
        ("BGRA HxWx4", _rng().integers(0, 256, (48, 64, 4), dtype=np.uint8)),
        ("uint16", _rng().integers(0, 65536, (48, 64, 3), dtype=np.uint16)),
        ("float64 0..255", _rng().uniform(0, 255, (48, 64, 3))),
        ("float32 0..255", _rng().uniform(0, 255, (48, 64, 3)).astype(np.float32)),
        ("int64 0..255", _rng().integers(0, 256, (48, 64, 3))),
        ("1x1", np.full((1, 1, 3), 128, np.uint8)),
        ("16x4000", _rng().integers(0, 256, (16, 4000, 3), dtype=np.uint8)),
        ("1x20000 (resizes to < 1 px high)", _rng().integers(0, 256, (1, 20000, 3), dtype=np.uint8)),
        ("non-contiguous view", _rng().integers(0, 256, (96, 128, 3), dtype=np.uint8)[::2, ::-2]),
    ],
)
def test_predictor_accepts_odd_images(predictor, name, image):
    _check_output(predictor(image), image.shape[0], image.shape[1])


def test_predictor_grayscale_equals_replicated_bgr_and_rgba_equals_bgr(predictor):
    gray = _rng().integers(0, 256, (40, 56), dtype=np.uint8)
    a = predictor(gray)["instances"]
    b = predictor(np.repeat(gray[:, :, None], 3, axis=2))["instances"]
    assert torch.equal(a.pred_masks, b.pred_masks) and torch.allclose(a.scores, b.scores)
    bgr = _rng().integers(0, 256, (40, 56, 3), dtype=np.uint8)
    bgra = np.concatenate([bgr, np.zeros((40, 56, 1), np.uint8)], axis=2)
    assert torch.equal(predictor(bgr)["instances"].pred_masks, predictor(bgra)["instances"].pred_masks)


def test_predictor_larger_than_4000(predictor):
    image = np.zeros((4100, 4100, 3), np.uint8)  # resized to 128 x 128 for the tiny model
    image[1000:3000, 500:2500] = (200, 30, 30)
    predictor.model.postprocess.max_per_image = 1  # keep the full-size masks cheap
    try:
        _check_output(predictor(image), 4100, 4100)
    finally:
        predictor.model.postprocess.max_per_image = LOW["MODEL.SOLO.MAX_PER_IMAGE"]


@pytest.mark.parametrize(
    "image,error,match",
    [
        (np.zeros((0, 0, 3), np.uint8), ValueError, r"image is empty: shape \(0, 0, 3\)"),
        (np.zeros((0, 0), np.uint8), ValueError, "image is empty"),
        (np.zeros((5, 0, 3), np.uint8), ValueError, "image is empty"),
        (np.full((8, 8, 3), np.nan, np.float32), ValueError, "192 NaN or inf"),
        (np.where(np.eye(8)[:, :, None] > 0, np.inf, 0.0).repeat(3, 2), ValueError, "NaN or inf"),
        (np.zeros((8, 8, 5), np.uint8), ValueError, r"shape .*\(8, 8, 5\)"),
        (np.zeros((2, 8, 8, 3), np.uint8), ValueError, "must have shape"),
        (np.zeros((8, 8), bool), TypeError, "dtype bool"),
        (np.full((8, 8, 3), 300, np.int32), ValueError, r"int32 with values in \[300, 300\]"),
        (torch.zeros(3, 8, 8), TypeError, "numpy array"),
        ("image.png", TypeError, "numpy array"),
    ],
)
def test_predictor_refuses_bad_images_clearly(predictor, image, error, match):
    with pytest.raises(error, match=match):
        predictor(image)


def test_model_input_nan_inf_pixels_name_the_image(predictor):
    model = predictor.model
    good = torch.full((3, 32, 32), 100.0)
    for bad_value in (float("nan"), float("inf"), float("-inf")):
        bad = good.clone()
        bad[1, 3, 4] = bad_value
        with pytest.raises(ValueError, match=r"batched_inputs\[1\]\['image'\] has 1 non-finite"):
            with torch.no_grad():
                model([{"image": good}, {"image": bad}])


@pytest.mark.parametrize(
    "inputs,error,match",
    [
        ([], TypeError, "non-empty list"),
        ([{"img": torch.zeros(3, 8, 8)}], TypeError, r"batched_inputs\[0\] must be a dict with an 'image'"),
        ([{"image": np.zeros((3, 8, 8))}], TypeError, r"batched_inputs\[0\]\['image'\] must be a torch.Tensor"),
        ([{"image": torch.zeros(3, 8, 8, dtype=torch.int32)}], TypeError, "dtype torch.int32"),
        ([{"image": torch.zeros(3, 0, 0)}], ValueError, "empty"),
        ([{"image": torch.zeros(3, 8, 8), "height": 0, "width": 8}], ValueError, r"\['height'\].*positive"),
    ],
)
def test_model_refuses_bad_inputs_clearly(predictor, inputs, error, match):
    with pytest.raises(error, match=match), torch.no_grad():
        predictor.model(inputs)


def test_model_output_has_requested_size(predictor):
    with torch.no_grad():
        out = predictor.model([{"image": torch.full((3, 64, 96), 120, dtype=torch.uint8), "height": 7, "width": 300}])
    _check_output(out[0], 7, 300)


@pytest.mark.parametrize("head", ["SOLOHead", "DecoupledSOLOHead", "SOLOv2Head"])
def test_training_step_on_a_batch_of_only_empty_annotation_images(head):
    torch.manual_seed(0)
    cfg = tiny_cfg(head)
    model = Trainer.build_model(cfg)
    model.train()
    batch = [
        {"image": torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8), "instances": instances(96, 128, [])}
        for _ in range(2)
    ]
    losses = model(batch)
    assert set(losses) == {"loss_cate", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() == 0.0  # no positive cell
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)  # DDP needs every grad


def test_training_input_without_instances_is_refused():
    model = Trainer.build_model(tiny_cfg())
    model.train()
    with pytest.raises(ValueError, match=r"batched_inputs\[0\] has no 'instances'"):
        model([{"image": torch.zeros(3, 32, 32)}])


def _register(name, dicts):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=list(CLASSES))


@pytest.mark.parametrize("problem", ["missing", "truncated", "not an image"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_unreadable_dataset_image_names_the_file(tmp_path, problem, split):
    dicts = write_dataset(tmp_path, f"hostile_{split}", 1, seed=0)
    path = tmp_path / f"hostile_{split}_0.png"
    if problem == "missing":
        path.unlink()
    elif problem == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"this is not a PNG file\n" * 10)
    _register(f"hostile_{split}", dicts)
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = ("hostile_train",) if split == "train" else ()
    if split == "train":
        loader = iter(Trainer.build_train_loader(cfg))
    else:
        loader = iter(Trainer.build_test_loader(cfg, "hostile_test"))
    with pytest.raises(ImageLoadError, match=str(path).replace("\\", "\\\\")) as exc:
        next(loader)
    assert "hostile" in str(exc.value)


def test_predictor_falls_back_to_cpu_when_the_cfg_says_cuda(monkeypatch):
    # The README's snippet on a CPU-only machine: a cfg that says cuda gives a working CPU predictor.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tiny_cfg()
    cfg.MODEL.DEVICE = "cuda"
    cfg.freeze()
    predictor = SOLOPredictor(cfg, allow_partial_weights=True)  # random weights, on purpose
    assert predictor.cfg.MODEL.DEVICE == "cpu" and cfg.MODEL.DEVICE == "cuda"
    assert next(predictor.model.parameters()).device.type == "cpu"
    out = predictor(np.zeros((40, 50, 3), np.uint8))
    assert out["instances"].image_size == (40, 50)


def test_get_solo_cfg_decides_the_device_once(monkeypatch):
    from solo_d2 import get_solo_cfg, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cuda") == "cpu" and resolve_device("cuda:1") == "cpu"
    assert resolve_device("cpu") == "cpu"
    assert get_solo_cfg(opts=["MODEL.DEVICE", "cuda"]).MODEL.DEVICE == "cpu"
    assert get_solo_cfg(opts=["MODEL.DEVICE", "cuda"], device_fallback=False).MODEL.DEVICE == "cuda"
