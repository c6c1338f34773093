"""Shared fixtures: a tiny SOLO config and tiny synthetic datasets registered with Detectron2."""
import os
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BitMasks, BoxMode, Instances

import solo_d2

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "tests" / "SOLO_tiny.yaml")
CLASSES = ["rect", "ellipse", "triangle", "cross"]

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_torch_thread():
    """1 torch thread for a test module (``pytestmark = pytest.mark.usefixtures(...)``): on a
    shared 2-core machine, 2 OpenMP threads competing with other processes made a training step
    10-20x slower (measured 2-5 s vs 0.2-0.3 s); results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cfg(head_type="SOLOHead", **overrides):
    """The tiny test config on CPU; ``overrides`` are flat KEY=VALUE pairs ("MODEL.SOLO.X")."""
    cfg = get_cfg()
    solo_d2.add_solo_config(cfg)
    cfg.merge_from_file(TINY_CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SOLO.HEAD_TYPE = head_type
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg


def draw_shape(kind: int, h: int, w: int, box) -> np.ndarray:
    """A bool (h, w) mask of shape ``kind`` (0..3) filling ``box`` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    m = np.zeros((h, w), np.uint8)
    if kind == 0:
        m[y0:y1, x0:x1] = 1
    elif kind == 1:
        cv2.ellipse(m, ((x0 + x1) // 2, (y0 + y1) // 2), ((x1 - x0) // 2, (y1 - y0) // 2), 0, 0, 360, 1, -1)
    elif kind == 2:
        pts = np.array([[x0, y1 - 1], [x1 - 1, y1 - 1], [(x0 + x1) // 2, y0]], np.int32)
        cv2.fillPoly(m, [pts], 1)
    else:
        tw, th = max((x1 - x0) // 3, 1), max((y1 - y0) // 3, 1)
        m[y0 + th : y1 - th, x0:x1] = 1
        m[y0:y1, x0 + tw : x1 - tw] = 1
    return m.astype(bool)


def make_image(rng: np.random.Generator, h=128, w=128, max_objects=3, min_size=16, max_size=64):
    """(image uint8 HxWx3 BGR, [(class, visible mask bool HxW)]): non-empty, later objects occlude."""
    img = (rng.normal(110, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    objs = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        size = int(rng.integers(min_size, max_size + 1))
        x0 = int(rng.integers(0, w - size + 1))
        y0 = int(rng.integers(0, h - size + 1))
        kind = int(rng.integers(0, 4))
        m = draw_shape(kind, h, w, (x0, y0, x0 + size, y0 + size))
        colour = rng.integers(0, 256, 3)
        img[m] = colour
        objs = [(c, om & ~m) for c, om in objs]
        objs.append((kind, m))
    return img, [(c, m) for c, m in objs if m.sum() >= 10]


def write_dataset(root: Path, name: str, num_images: int, seed: int, **kw):
    """Write PNGs + Detectron2 dicts (RLE masks) and register them as ``name``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dicts = []
    for i in range(num_images):
        img, objs = make_image(rng, **kw)
        path = str(root / f"{name}_{i}.png")
        cv2.imwrite(path, img)
        anns = []
        for c, m in objs:
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append(
                {
                    "category_id": c,
                    "segmentation": rle,
                    "bbox": mask_util.toBbox(rle).tolist(),
                    "bbox_mode": BoxMode.XYWH_ABS,
                    "iscrowd": 0,
                }
            )
        dicts.append(
            {"file_name": path, "image_id": i, "height": img.shape[0], "width": img.shape[1], "annotations": anns}
        )
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=list(CLASSES), evaluator_type="coco")
    return dicts


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """8 training images of 128x128 with 1-3 objects each, registered as ``solo_tiny_train``."""
    write_dataset(tmp_path_factory.mktemp("tiny"), "solo_tiny_train", 8, seed=0)
    return "solo_tiny_train"


def instances(h, w, boxes_and_classes, image_size=None):
    """GT Instances of size ``image_size or (h, w)`` with rectangular masks for (x0, y0, x1, y1, cls)."""
    inst = Instances(image_size or (h, w))
    m = torch.zeros(len(boxes_and_classes), h, w, dtype=torch.bool)
    for i, (x0, y0, x1, y1, _) in enumerate(boxes_and_classes):
        m[i, y0:y1, x0:x1] = True
    inst.gt_masks = BitMasks(m)
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
    inst.gt_classes = torch.tensor([c for *_, c in boxes_and_classes], dtype=torch.int64)
    return inst
