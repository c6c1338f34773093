"""Drawing SOLO predictions with Detectron2's ``Visualizer``: the logic of ``demo/demo.py`` and of
the pictures of ``make demo``.

* :func:`setup_demo_cfg` builds an inference cfg (``--config-file`` + ``opts``, CPU fallback, score
  thresholds no higher than the display threshold).
* :class:`VisualizationDemo` runs a :class:`solo_d2.SOLOPredictor` (safe weight loading, input
  checks) on images or video frames and draws them
  (like ``VisualizationDemo`` of Detectron2's ``demo/predictor.py``).
* :func:`draw_predictions`, :func:`draw_ground_truth`, :func:`side_by_side` and
  :func:`visualize_dataset` draw ground truth beside predictions for images of a registered
  dataset.
"""
import os

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

from .config import get_solo_cfg
from .data.image_io import read_image
from .predictor import SOLOPredictor

__all__ = [
    "setup_demo_cfg",
    "read_image_bgr",
    "VisualizationDemo",
    "draw_predictions",
    "draw_ground_truth",
    "side_by_side",
    "visualize_dataset",
]


def setup_demo_cfg(config_file, opts=(), confidence_threshold=0.5):
    """Frozen inference cfg: :func:`solo_d2.get_solo_cfg` of ``config_file`` and ``opts``.

    ``MODEL.SOLO.SCORE_THRESH_TEST`` and ``UPDATE_THRESH_TEST`` are lowered to
    ``confidence_threshold`` when higher (a final score never exceeds the category score, so the
    model then keeps every detection the display threshold would show). ``MODEL.DEVICE`` falls
    back to cpu without CUDA.
    """
    cfg = get_solo_cfg(config_file, opts)
    t = float(confidence_threshold)
    cfg.MODEL.SOLO.SCORE_THRESH_TEST = min(cfg.MODEL.SOLO.SCORE_THRESH_TEST, t)
    cfg.MODEL.SOLO.UPDATE_THRESH_TEST = min(cfg.MODEL.SOLO.UPDATE_THRESH_TEST, t)
    cfg.freeze()
    return cfg


def read_image_bgr(path):
    """A BGR uint8 image (EXIF orientation applied; 16-bit images scaled to 8 bits, see
    :func:`solo_d2.data.image_io.read_image`), or ``ValueError`` naming ``path``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        return read_image(path, format="BGR")
    except Exception as e:  # PIL: UnidentifiedImageError, OSError (truncated), ...
        raise ValueError(f"{path}: cannot read this image ({type(e).__name__}: {e})") from e


def _metadata(cfg):
    names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    return MetadataCatalog.get(names[0] if names else "__unused")


def _keep_confident(instances, threshold):
    instances = instances.to("cpu")
    if instances.has("scores"):
        instances = instances[instances.scores >= threshold]
    return instances


def draw_predictions(image_rgb, instances, metadata, confidence_threshold=0.5, scale=1.0,
                     instance_mode=ColorMode.IMAGE):
    """RGB uint8 image of ``instances`` (a model's output) with a score >= the threshold drawn
    on ``image_rgb``; the output is ``scale`` times the input size."""
    vis = Visualizer(image_rgb, metadata, scale=scale, instance_mode=instance_mode)
    return vis.draw_instance_predictions(_keep_confident(instances, confidence_threshold)).get_image()


def draw_ground_truth(image_rgb, dataset_dict, metadata, scale=1.0):
    """RGB uint8 image of the annotations of a Detectron2 dataset dict drawn on ``image_rgb``."""
    vis = Visualizer(image_rgb, metadata, scale=scale)
    return vis.draw_dataset_dict(dataset_dict).get_image()


def side_by_side(images, titles=None, gap=8):
    """Concatenate RGB uint8 images horizontally (padded to the tallest), with a white ``gap``
    between them and, if given, a title strip above each."""
    h = max(im.shape[0] for im in images)
    cols = []
    for i, im in enumerate(images):
        pad = np.full((h - im.shape[0], im.shape[1], 3), 255, np.uint8)
        col = np.concatenate([im, pad], axis=0)
        if titles:
            strip = np.full((28, im.shape[1], 3), 255, np.uint8)
            cv2.putText(strip, str(titles[i]), (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                        (0, 0, 0), 1, cv2.LINE_AA)
            col = np.concatenate([strip, col], axis=0)
        cols.append(col)
        if i + 1 < len(images):
            cols.append(np.full((col.shape[0], gap, 3), 255, np.uint8))
    return np.concatenate(cols, axis=1)


class VisualizationDemo:
    """A :class:`solo_d2.SOLOPredictor` and Detectron2's ``Visualizer`` (cf. Detectron2's
    ``demo/predictor.py``). Class names come from the metadata of ``cfg.DATASETS.TEST[0]``."""

    def __init__(self, cfg, confidence_threshold=0.5, instance_mode=ColorMode.IMAGE,
                 allow_partial_weights=None):
        """``allow_partial_weights``: see :class:`solo_d2.predictor.SOLOPredictor` (weights that
        do not fit the head, or none, are an error unless allowed)."""
        self.cfg = cfg
        self.metadata = _metadata(cfg)
        self.confidence_threshold = float(confidence_threshold)
        self.instance_mode = instance_mode
        self.predictor = SOLOPredictor(cfg, allow_partial_weights=allow_partial_weights)

    def run_on_image(self, image_bgr):
        """Returns ``(predictions, vis_rgb)``: the model's output dict for a BGR uint8 image and
        an RGB uint8 drawing of its confident instances, of the image's size."""
        predictions = self.predictor(image_bgr)
        image_rgb = image_bgr[:, :, ::-1]
        vis = draw_predictions(image_rgb, predictions["instances"], self.metadata,
                               self.confidence_threshold, instance_mode=self.instance_mode)
        return predictions, vis

    def run_on_video(self, video):
        """Yield a BGR uint8 drawing for each frame of a ``cv2.VideoCapture``."""
        video_visualizer = VideoVisualizer(self.metadata, self.instance_mode)
        while video.isOpened():
            ok, frame = video.read()
            if not ok:
                break
            predictions = self.predictor(frame)
            instances = _keep_confident(predictions["instances"], self.confidence_threshold)
            vis = video_visualizer.draw_instance_predictions(frame[:, :, ::-1], instances)
            yield cv2.cvtColor(vis.get_image(), cv2.COLOR_RGB2BGR)


def visualize_dataset(cfg, dataset_name, output_dir, num_images=4, confidence_threshold=0.5,
                      scale=2.0):
    """Write ``output_dir/<image>.png``: ground truth beside predictions, for ``num_images``
    images (those with annotations first, in dataset order) of the registered ``dataset_name``.

    ``cfg``: a frozen inference cfg whose ``MODEL.WEIGHTS`` is the trained model. Returns the
    list of written paths.
    """
    dicts = DatasetCatalog.get(dataset_name)
    metadata = MetadataCatalog.get(dataset_name)
    chosen = [d for d in dicts if d.get("annotations")][:num_images]
    if len(chosen) < num_images:
        chosen += [d for d in dicts if not d.get("annotations")][: num_images - len(chosen)]
    predictor = SOLOPredictor(cfg)
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for d in chosen:
        image_bgr = read_image_bgr(d["file_name"])
        image_rgb = np.ascontiguousarray(image_bgr[:, :, ::-1])
        instances = predictor(image_bgr)["instances"]
        n = int((instances.scores >= confidence_threshold).sum())
        gt = draw_ground_truth(image_rgb, d, metadata, scale=scale)
        pred = draw_predictions(image_rgb, instances, metadata, confidence_threshold, scale=scale)
        canvas = side_by_side(
            [gt, pred],
            [f"ground truth ({len(d.get('annotations', []))})",
             f"prediction ({n}, score >= {confidence_threshold:g})"],
        )
        stem = os.path.splitext(os.path.basename(d["file_name"]))[0]
        path = os.path.join(output_dir, f"{stem}.png")
        cv2.imwrite(path, cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths
