"""Deploy: the exported model (torch.export, ONNX in ONNX Runtime) against the eager one, the ONNX
runner against the Python predictor, dynamic and static sizes, and the export tool's errors."""
import cv2
import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, load_script, make_image, tiny_cfg

from detectron2.modeling import build_model

from solo_d2.deploy import SOLODeployModel
from solo_d2.deploy.exporter import export_torch, size_bounds
from solo_d2.modeling import matrix_nms
from solo_d2.modeling.layers import linspace_unit

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_export_form_of_linspace_equals_linspace(monkeypatch):
    like = torch.zeros(1)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    for n in range(1, 400):
        assert torch.equal(linspace_unit(n, like), torch.linspace(-1, 1, n)), n


def test_matrix_nms_of_nothing():
    out = matrix_nms(torch.zeros(0, 5, 5, dtype=torch.bool), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert out.shape == (0,) and out.dtype == torch.float32


def forced_model(head_type="SOLOHead", seed=0):
    """The tiny config with random weights whose cells all score ~0.5 and whose masks are random
    blobs (so that the postprocessing has candidates, masks and overlaps to handle)."""
    torch.manual_seed(seed)
    model = build_model(tiny_cfg(head_type)).eval()
    torch.nn.init.normal_(model.head.cate_pred.weight, std=0.05)
    model.head.cate_pred.bias.data.zero_()
    for conv in model.head.mask_output_convs():
        torch.nn.init.normal_(conv.weight, std=1.0)
        conv.bias.data.zero_()
    return model


def as_chw(bgr):
    return torch.as_tensor(np.ascontiguousarray(bgr.transpose(2, 0, 1)))


def max_score(model, image):
    with torch.no_grad():
        feats = model.backbone(((image.float() - model.pixel_mean) / model.pixel_std)[None])
        cate, _ = model.head([feats[f] for f in model.in_features])
    return max(float(c.sigmoid().max()) for c in cate)


def scene(model):
    """(image with objects, empty image) and a score threshold between their best category
    scores, so that the first has detections and the second none."""
    img, _ = make_image(np.random.default_rng(0))
    objects, empty = as_chw(img), torch.full((3, 128, 128), 110, dtype=torch.uint8)
    a, b = max_score(model, objects), max_score(model, empty)
    if a < b:
        objects, empty, a, b = empty, objects, b, a
    assert a > b
    return objects, empty, (a + b) / 2


def mask_iou(a, b):
    a, b = torch.as_tensor(a).bool(), torch.as_tensor(b).bool()
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def assert_close_outputs(ref, got, what=""):
    """The deploy check: same count and classes, scores within 1e-3, mask IoU >= 0.99."""
    masks, scores, classes, boxes = (torch.as_tensor(np.asarray(x)) for x in got)
    assert masks.shape == ref[0].shape, what
    assert masks.dtype == torch.bool and scores.dtype == torch.float32, what
    assert classes.dtype == torch.int64 and boxes.dtype == torch.float32 and boxes.shape == (len(scores), 4), what
    assert torch.equal(classes, ref[2]), what
    assert torch.allclose(scores, ref[1], atol=1e-3, rtol=0), what
    if len(scores):
        assert mask_iou(masks, ref[0]).min() >= 0.99, what


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The forced tiny SOLOHead model, its weights file and threshold, and its ONNX and
    torch.export files written by tools/deploy/export_model.py (dynamic size)."""
    tool = load_script("tools/deploy/export_model.py", "export_model_tool")
    model = forced_model()
    objects, empty, thresh = scene(model)
    model.postprocess.score_thresh = thresh
    tmp = tmp_path_factory.mktemp("export")
    weights = str(tmp / "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    opts = ["MODEL.WEIGHTS", weights, "MODEL.SOLO.SCORE_THRESH_TEST", str(thresh)]
    files = {}
    for fmt in ("onnx", "torch-export"):
        files[fmt] = tool.main(["--config-file", TINY_CONFIG, "--format", fmt, "--output", str(tmp / fmt), *opts])
    return {"model": model, "objects": objects, "empty": empty, "opts": opts, "files": files, "tool": tool}


def runners(files):
    from solo_d2.deploy.runtime import onnx_runner, torch_export_runner

    return {"onnx": onnx_runner(files["onnx"]), "torch-export": torch_export_runner(files["torch-export"])}


def test_exported_equal_eager_with_and_without_objects(exported):
    wrapper = SOLODeployModel(exported["model"]).eval()
    run = runners(exported["files"])
    for name, image in (("objects", exported["objects"]), ("empty", exported["empty"])):
        with torch.no_grad():
            ref = wrapper(image)
            # The wrapper computes what the model's own inference computes.
            inst = exported["model"]([{"image": image}])[0]["instances"]
        assert torch.equal(inst.pred_classes, ref[2]) and torch.allclose(inst.scores, ref[1], atol=1e-5)
        assert (len(ref[1]) > 0) == (name == "objects"), name
        for fmt, r in run.items():
            assert_close_outputs(ref, r(image), f"{fmt} on {name}")


def test_one_file_runs_two_sizes(exported):
    wrapper = SOLODeployModel(exported["model"]).eval()
    run = runners(exported["files"])
    img, _ = make_image(np.random.default_rng(1), h=96, w=160)
    for image in (as_chw(img), exported["objects"][:, :100, :]):
        with torch.no_grad():
            ref = wrapper(image)
        for fmt, r in run.items():
            assert_close_outputs(ref, r(image), f"{fmt} at {tuple(image.shape)}")


def test_onnx_runner_equals_the_python_predictor(exported):
    from solo_d2.predictor import SOLOPredictor

    demo = load_script("demo/onnx_demo.py", "onnx_demo")
    runner = demo.ONNXSOLO(exported["files"]["onnx"])
    assert runner.min_size == 128 and runner.input_format == "BGR"
    predictor = SOLOPredictor(tiny_cfg("SOLOHead", **dict(zip(exported["opts"][::2], exported["opts"][1::2]))))
    bgr = np.ascontiguousarray(exported["objects"].numpy().transpose(1, 2, 0))  # a 128 x 128 shapes image
    inst = predictor(bgr)["instances"]
    pred = runner(bgr)
    assert len(inst) > 0
    ref = (inst.pred_masks, inst.scores, inst.pred_classes, inst.pred_boxes.tensor)
    assert_close_outputs(ref, (pred["masks"], pred["scores"], pred["classes"], pred["boxes"]))
    assert np.abs(pred["boxes"] - inst.pred_boxes.tensor.numpy()).max() <= 1.0


def test_export_tool_errors(exported, tmp_path, capsys):
    tool = exported["tool"]
    from solo_d2.utils.cli import UserError

    with pytest.raises(UserError, match=r"missing\.pth' does not exist"):
        tool.main(["--config-file", TINY_CONFIG, "--format", "onnx", "--output", str(tmp_path),
                   "MODEL.WEIGHTS", str(tmp_path / "missing.pth")])
    with pytest.raises(SystemExit) as e:
        tool.main(["--config-file", TINY_CONFIG, "--format", "tflite", "--output", str(tmp_path)])
    assert e.value.code == 2 and "tflite" in capsys.readouterr().err
    with pytest.raises(UserError, match="nope.yaml"):
        tool.main(["--config-file", str(tmp_path / "nope.yaml"), "--format", "onnx", "--output", str(tmp_path)])
    wrapper = SOLODeployModel(exported["model"])
    with pytest.raises(ValueError, match="uint8"):
        export_torch(wrapper, torch.zeros(3, 128, 128))
    lo, _ = size_bounds(wrapper)
    with pytest.raises(ValueError, match="dynamic export"):
        export_torch(wrapper, torch.zeros(3, lo - 1, 128, dtype=torch.uint8))


def test_onnx_demo_errors(tmp_path):
    demo = load_script("demo/onnx_demo.py", "onnx_demo")
    cv2.imwrite(str(tmp_path / "x.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="none.onnx"):
        demo.main(["--model", str(tmp_path / "none.onnx"), "--input", str(tmp_path / "x.png"),
                   "--output", str(tmp_path / "o.png")])


@pytest.mark.slow
def test_static_size_export(exported, tmp_path):
    import onnxruntime as ort

    path = exported["tool"].main(["--config-file", TINY_CONFIG, "--format", "onnx", "--output", str(tmp_path),
                                  "--static-size", "128", "128", *exported["opts"]])
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [3, 128, 128]
    with torch.no_grad():
        ref = SOLODeployModel(exported["model"]).eval()(exported["objects"])
    assert_close_outputs(ref, session.run(None, {"image": exported["objects"].numpy()}), "static")
    with pytest.raises(Exception):
        session.run(None, {"image": np.zeros((3, 96, 128), np.uint8)})


@pytest.mark.slow
@pytest.mark.parametrize(
    "head_type",
    # DecoupledSOLOCompactHead is the light head with its output conv moved before the upsample:
    # the same operators in another order.
    ["DecoupledSOLOHead", "DecoupledSOLOLightHead", "SOLOv2Head"],
)
def test_every_head_type_exports(head_type, tmp_path):
    from solo_d2.deploy.exporter import export_onnx
    from solo_d2.deploy.runtime import onnx_runner

    model = forced_model(head_type)
    objects, empty, thresh = scene(model)
    model.postprocess.score_thresh = thresh
    wrapper = SOLODeployModel(model).eval()
    ep = export_torch(wrapper, objects)
    path = export_onnx(wrapper, objects, str(tmp_path / "model.onnx"), exported_program=ep)
    run = onnx_runner(path)
    img, _ = make_image(np.random.default_rng(2), h=112, w=150)
    for image in (objects, empty, as_chw(img)):
        with torch.no_grad():
            ref, got = wrapper(image), ep.module()(image)
        assert_close_outputs(ref, got, f"torch.export {head_type}")
        assert_close_outputs(ref, run(image), f"onnx {head_type}")
