"""The built-in synthetic instance-segmentation dataset "shapes".

Each image shows 0..``max_objects`` flat-coloured shapes (:data:`SHAPES_CLASSES`: circle, square,
triangle and a non-convex 5-point star) on a textured background (a smooth random colour gradient
plus gaussian noise). Later shapes occlude earlier ones, and every instance mask is the *visible*
part of its shape. Object sizes (``sqrt`` of the box area) are log-uniform between ``min_size``
and ``max_size`` so that every FPN level of SOLO gets objects in its scale range.

Three entry points:

* :func:`render_shapes_image` draws one image in memory from a numpy ``Generator``.
* :func:`generate_shapes_dataset` writes ``root/<split>/NNNNNN.png`` plus a COCO json
  ``root/<split>.json``. Generation is deterministic: the same arguments give byte-identical
  PNGs and JSON.
* :func:`register_shapes_datasets` registers ``shapes_train`` / ``shapes_val`` with Detectron2;
  the data is generated lazily, the first time ``DatasetCatalog.get(name)`` is called.

Command line: ``tools/generate_shapes.py``.
"""
import colorsys
import json
import logging
import math
import os
from pathlib import Path

import cv2
import numpy as np

from ..utils.file_io import atomic_write

__all__ = [
    "SHAPES_CLASSES",
    "render_shapes_image",
    "generate_shapes_dataset",
    "register_shapes_datasets",
    "default_shapes_root",
]

logger = logging.getLogger(__name__)

#: Class names; the COCO json uses category ids 1..4 in this order (Detectron2 maps them to 0..3).
SHAPES_CLASSES = ["circle", "square", "triangle", "star"]

#: Visible instances smaller than this many pixels are dropped (never written to the json).
MIN_VISIBLE_AREA = 10

#: Default splits registered by :func:`register_shapes_datasets`: name -> generation arguments.
DEFAULT_SPLITS = {
    "shapes_train": dict(split="train", num_images=300, seed=0),
    "shapes_val": dict(split="val", num_images=50, seed=1),
    # What the demo configs train on: 2,400 images (the first 300 are shapes_train's), so that
    # a model trained from scratch does not overfit (docs/benchmarks/demo.md).
    "shapes_train_large": dict(split="train_large", num_images=2400, seed=0),
}

# Sub-pixel precision of cv2 drawing (coordinates are multiplied by 2**_SHIFT).
_SHIFT = 4
_SCALE = 1 << _SHIFT
# Fixed "info" block: no timestamps, so the json is reproducible byte for byte.
_INFO = {
    "description": "solo_d2 synthetic shapes dataset",
    "version": "1.0",
    "contributor": "solo_d2",
}


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _unit_polygon(category_id):
    """Vertices (K, 2) float64 of a shape centred at the origin, before rotation and scaling."""
    if category_id == 2:  # square
        return np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    if category_id == 3:  # equilateral triangle
        ang = np.deg2rad([-90.0, 30.0, 150.0])
        return np.stack([np.cos(ang), np.sin(ang)], axis=1)
    if category_id == 4:  # 5-point star (non-convex), inner radius 0.45 of the outer one
        ang = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
    raise ValueError(f"no polygon for category_id {category_id}")


def _random_colour(rng):
    """A random saturated RGB colour as a tuple of 3 python ints in [0, 255]."""
    h = rng.random()
    s = rng.uniform(0.65, 1.0)
    v = rng.uniform(0.6, 1.0)
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))


def _render_background(rng, height, width, noise_std=8.0):
    """Textured background: a smooth, weakly saturated colour gradient (bilinear upsampling of a
    random 3x3 grid of colours) plus gaussian noise. Returns uint8 (H, W, 3)."""
    grid = rng.uniform(40.0, 215.0, size=(3, 3, 3)).astype(np.float32)
    # Halve the chroma so that the saturated objects stand out from the background.
    grey = grid.mean(axis=2, keepdims=True)
    grid = grey + 0.5 * (grid - grey)
    bg = cv2.resize(grid, (width, height), interpolation=cv2.INTER_LINEAR)
    bg = bg.reshape(height, width, 3)
    bg += rng.normal(0.0, noise_std, size=(height, width, 3)).astype(np.float32)
    return np.clip(np.rint(bg), 0, 255).astype(np.uint8)


def _draw_shape(rng, category_id, size, height, width):
    """Draw one shape of box size ~``size`` (sqrt of box area) at a random place.

    Returns a uint8 (H, W) mask with 1 on the shape's pixels.
    """
    canvas = np.zeros((height, width), dtype=np.uint8)
    if category_id == 1:  # circle: box is (2r)x(2r)
        r = min(size / 2.0, (min(height, width) - 1) / 2.0)
        cx = rng.uniform(r, width - 1 - r) if width - 1 > 2 * r else (width - 1) / 2.0
        cy = rng.uniform(r, height - 1 - r) if height - 1 > 2 * r else (height - 1) / 2.0
        cv2.circle(
            canvas,
            (int(round(cx * _SCALE)), int(round(cy * _SCALE))),
            max(int(round(r * _SCALE)), 1),
            1,
            thickness=-1,
            lineType=cv2.LINE_8,
            shift=_SHIFT,
        )
        return canvas

    pts = _unit_polygon(category_id)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    c, s = math.cos(theta), math.sin(theta)
    pts = pts @ np.array([[c, s], [-s, c]])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    w, h = hi - lo
    # Scale so that sqrt(box area) == size, then shrink if the box would not fit the image.
    scale = size / math.sqrt(w * h)
    scale = min(scale, (width - 1) / w, (height - 1) / h)
    pts = (pts - (lo + hi) / 2.0) * scale
    bw, bh = w * scale, h * scale
    cx = rng.uniform(bw / 2.0, width - 1 - bw / 2.0) if width - 1 > bw else (width - 1) / 2.0
    cy = rng.uniform(bh / 2.0, height - 1 - bh / 2.0) if height - 1 > bh else (height - 1) / 2.0
    pts = pts + np.array([cx, cy])
    poly = np.rint(pts * _SCALE).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(canvas, [poly], 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return canvas


def render_shapes_image(
    rng,
    height=256,
    width=256,
    max_objects=6,
    min_size=12.0,
    max_size=200.0,
    empty_prob=0.05,
    noise_std=8.0,
    max_occlusion=0.5,
    max_tries=10,
    min_objects=1,
    num_large=0,
    large_size=(96.0, 400.0),
):
    """Render one synthetic image and the visible masks of its objects.

    Args:
        rng (np.random.Generator): source of all randomness (the result is a pure function of
            its state and of the other arguments).
        height, width (int): image size in pixels, > 0.
        max_objects (int): the image tries to place ``rng.integers(1, max_objects + 1)``
            objects (see ``max_occlusion``), or none with probability ``empty_prob``.
        min_size, max_size (float): range of the object size ``sqrt(box_w * box_h)`` in pixels;
            sizes are log-uniform in it. Objects that would not fit are shrunk to the image.
        empty_prob (float): probability, in [0, 1], that the image has no objects at all.
        noise_std (float): std of the gaussian noise added to the background gradient.
        max_occlusion (float): at most this fraction, in [0, 1], of an object's pixels may be
            hidden by later objects. A placement that would hide more is re-drawn, up to
            ``max_tries`` times, after which the object is left out.
        max_tries (int): placement attempts per object, >= 1.
        min_objects (int): the number of objects tried is ``rng.integers(min_objects,
            max_objects + 1)`` (large images: many small objects).
        num_large (int): that many more objects, of sizes log-uniform in ``large_size`` (min,
            max), e.g. objects that cross the tiles of a tiled inference; 0 (default) draws no
            random number for them, so the images of the other arguments are unchanged.

    Returns:
        tuple(np.ndarray, list[dict]):
            * image: uint8 array (H, W, 3), **RGB**.
            * instances: one dict per visible object, in drawing order, with
              ``category_id`` (int, 1..4, index into :data:`SHAPES_CLASSES` plus one) and
              ``mask`` (bool array (H, W), the pixels where the object is visible; at least
              :data:`MIN_VISIBLE_AREA` pixels). Masks are pairwise disjoint. Objects are
              drawn largest first, so a small object is never hidden behind a large one.
    """
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got ({height}, {width})")
    if max_objects < 0:
        raise ValueError(f"max_objects must be >= 0, got {max_objects}")
    if not (0 < min_size <= max_size):
        raise ValueError(f"need 0 < min_size <= max_size, got min_size={min_size}, "
                         f"max_size={max_size}")
    if not (0.0 <= empty_prob <= 1.0):
        raise ValueError(f"empty_prob must be in [0, 1], got {empty_prob}")
    if not (0.0 <= max_occlusion <= 1.0):
        raise ValueError(f"max_occlusion must be in [0, 1], got {max_occlusion}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    if not 0 <= min_objects <= max(max_objects, 1):
        raise ValueError(f"need 0 <= min_objects <= max_objects, got min_objects={min_objects}, "
                         f"max_objects={max_objects}")
    if num_large < 0:
        raise ValueError(f"num_large must be >= 0, got {num_large}")
    if num_large and not 0 < large_size[0] <= large_size[1]:
        raise ValueError(f"need 0 < large_size min <= max, got {tuple(large_size)}")

    image = _render_background(rng, height, width, noise_std=noise_std)
    empty = rng.random() < empty_prob
    num = 0 if (empty or max_objects == 0) else int(rng.integers(min_objects, max_objects + 1))

    # Draw all random parameters first; draw the largest objects first.
    specs = []
    for k in range(num + (0 if empty else num_large)):
        lo, hi = (min_size, max_size) if k < num else large_size
        category_id = int(rng.integers(1, len(SHAPES_CLASSES) + 1))
        size = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        specs.append((category_id, size))
    specs.sort(key=lambda t: -t[1])

    # label[y, x] = 1-based index of the object visible at that pixel, 0 for background.
    label = np.zeros((height, width), dtype=np.uint16)
    placed = []  # (category_id, full area in pixels) of the objects drawn so far
    for category_id, size in specs:
        # Try a few placements; keep the first that leaves every earlier object at least
        # (1 - max_occlusion) of its full area visible, or skip the object.
        if placed:
            visible = np.bincount(label.ravel(), minlength=len(placed) + 1)[1:]
            keep = (1.0 - max_occlusion) * np.array([a for _, a in placed], dtype=np.float64)
        for _ in range(max_tries):
            shape = _draw_shape(rng, category_id, size, height, width).astype(bool)
            if placed:
                hidden = np.bincount(label[shape], minlength=len(placed) + 1)[1:]
                if np.any(visible - hidden < keep):
                    continue
            colour = _random_colour(rng)
            label[shape] = len(placed) + 1
            image[shape] = colour
            placed.append((category_id, int(shape.sum())))
            break

    instances = []
    for k, (category_id, _) in enumerate(placed):
        mask = label == k + 1
        if int(mask.sum()) >= MIN_VISIBLE_AREA:
            instances.append({"category_id": category_id, "mask": mask})
    return image, instances


# --------------------------------------------------------------------------------------------
# Dataset files
# --------------------------------------------------------------------------------------------
def _check_image_size(image_size):
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be a pair (height, width), got {image_size!r}")
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return h, w


def _image_rng(seed, index):
    """The per-image generator, a function of (seed, image index) only."""
    return np.random.Generator(np.random.PCG64([int(seed), int(index)]))


def _encode_annotation(mask, ann_id, image_id, category_id):
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [round(float(v), 2) for v in mask_util.toBbox(rle)]
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": int(category_id),
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": counts},
        "area": int(mask.sum()),
        "bbox": bbox,
        "iscrowd": 0,
    }


def generate_shapes_dataset(root, split, num_images, image_size=(256, 256), seed=0,
                            progress=True, **render_kwargs):
    """Write one split of the shapes dataset in COCO format.

    Writes ``root/<split>/000001.png`` ... (RGB images saved by ``cv2.imwrite``) and then, last
    and atomically, the COCO json ``root/<split>.json``; the json existing means the split is
    complete. Image ``i`` (0-based) is rendered from
    ``np.random.Generator(np.random.PCG64([seed, i]))``, so the same arguments always give
    byte-identical PNGs and json.

    Args:
        root (str or Path): dataset folder (created if missing).
        split (str): split name, used for the image folder and the json file name.
        num_images (int): number of images, >= 0.
        image_size (tuple[int, int]): (height, width), both > 0.
        seed (int): base seed of the split.
        progress (bool): show a tqdm progress bar.
        **render_kwargs: passed to :func:`render_shapes_image` (``max_objects``, ``min_size``,
            ``max_size``, ``empty_prob``, ``noise_std``, ``max_occlusion``, ``max_tries``).

    Returns:
        str: path of the written json.

    The json has ``images`` (``id`` from 1, ``file_name`` relative to ``root/<split>``,
    ``height``, ``width``), ``annotations`` (``id`` from 1, ``image_id``, ``category_id`` in
    1..4, ``segmentation`` as compressed RLE with str counts, ``area`` = mask pixel count (int),
    ``bbox`` [x, y, w, h] floats, ``iscrowd`` 0) and ``categories`` (``id``, ``name``,
    ``supercategory`` "shape").
    """
    if isinstance(num_images, bool) or int(num_images) != num_images or num_images < 0:
        raise ValueError(f"num_images must be an integer >= 0, got {num_images!r}")
    num_images = int(num_images)
    height, width = _check_image_size(image_size)
    split = str(split)
    if not split or os.sep in split or split in (".", ".."):
        raise ValueError(f"split must be a plain non-empty name, got {split!r}")

    root = Path(root)
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)

    images, annotations = [], []
    indices = range(num_images)
    if progress:
        try:
            from tqdm import tqdm

            indices = tqdm(indices, desc=f"shapes/{split}", unit="img", leave=False)
        except ImportError:  # pragma: no cover - tqdm is a detectron2 dependency
            pass
    for i in indices:
        image_id = i + 1
        image, instances = render_shapes_image(_image_rng(seed, i), height, width,
                                               **render_kwargs)
        file_name = f"{image_id:06d}.png"
        ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:  # pragma: no cover
            raise RuntimeError(f"cv2 could not encode {file_name}")
        atomic_write(image_dir / file_name, lambda f: f.write(buf.tobytes()))
        images.append({"id": image_id, "file_name": file_name, "height": height,
                       "width": width})
        for inst in instances:
            annotations.append(_encode_annotation(inst["mask"], len(annotations) + 1, image_id,
                                                  inst["category_id"]))

    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, name in enumerate(SHAPES_CLASSES)]
    dataset = {"info": dict(_INFO, split=split, seed=int(seed)), "images": images,
               "annotations": annotations, "categories": categories, "licenses": []}
    json_path = root / f"{split}.json"
    text = json.dumps(dataset, sort_keys=True, separators=(",", ":"))
    atomic_write(json_path, lambda f: f.write(text.encode("utf-8")))
    logger.info("Wrote %d images and %d instances to %s", num_images, len(annotations),
                json_path)
    return str(json_path)


# --------------------------------------------------------------------------------------------
# Detectron2 registration
# --------------------------------------------------------------------------------------------
def default_shapes_root():
    """Where the registered shapes datasets live: ``$SOLO_D2_DATASETS/shapes`` if that variable
    is set, else ``./datasets/shapes`` under the current directory (as Detectron2 does with
    ``DETECTRON2_DATASETS``: the variable names the parent of every dataset). Made absolute when
    called; the registered datasets call it when ``solo_d2`` is imported."""
    return Path(os.path.abspath(os.environ.get("SOLO_D2_DATASETS", "datasets"))) / "shapes"


def _split_name(dataset_name):
    return dataset_name[len("shapes_"):] if dataset_name.startswith("shapes_") else dataset_name


def _make_loader(name, json_file, image_root, split, gen_kwargs):
    def load():
        from detectron2.data.datasets import load_coco_json

        if not os.path.isfile(json_file):
            logger.info("Generating the shapes dataset %s in %s", name, image_root)
            generate_shapes_dataset(os.path.dirname(json_file), split, **gen_kwargs)
        return load_coco_json(json_file, image_root, name)

    return load


def register_shapes_datasets(root=None, splits=None):
    """Register shapes datasets with Detectron2's catalogs; the data is generated lazily.

    Nothing is generated here: the loader registered in ``DatasetCatalog`` first generates the
    split (:func:`generate_shapes_dataset`) if ``root/<split>.json`` is missing, then loads it
    with ``load_coco_json`` (category ids 1..4 become 0..3). The metadata gets ``json_file``,
    ``image_root``, ``evaluator_type="coco"`` and ``thing_classes=SHAPES_CLASSES`` right away.
    Idempotent: names already in ``DatasetCatalog`` are skipped.

    Args:
        root (str or Path or None): dataset folder; default :func:`default_shapes_root`.
        splits (dict or None): ``{dataset_name: dict(...)}`` of the datasets to register.
            ``None`` registers ``shapes_train`` (300 images, seed 0), ``shapes_val``
            (50 images, seed 1) and ``shapes_train_large`` (2,400 images, seed 0). Each value
            may hold ``split`` (folder / json name; default: the name without its ``shapes_``
            prefix), ``num_images``, ``seed``, ``image_size``
            and any :func:`render_shapes_image` keyword; missing keys come from the defaults of
            that name if it is a default name (``num_images`` 300, ``seed`` 0 otherwise).

    Returns:
        list[str]: the dataset names (registered now or before).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = Path(root) if root is not None else default_shapes_root()
    if splits is None:
        splits = DEFAULT_SPLITS
    names = []
    for name, spec in splits.items():
        names.append(name)
        if name in DatasetCatalog.list():
            continue
        kwargs = dict(DEFAULT_SPLITS.get(name, {"num_images": 300, "seed": 0}))
        kwargs.update(spec or {})
        split = str(kwargs.pop("split", _split_name(name)))
        if "image_size" in kwargs:
            kwargs["image_size"] = _check_image_size(kwargs["image_size"])
        json_file = str(root / f"{split}.json")
        image_root = str(root / split)
        DatasetCatalog.register(name, _make_loader(name, json_file, image_root, split, kwargs))
        MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root,
                                      evaluator_type="coco",
                                      thing_classes=list(SHAPES_CLASSES))
    return names
