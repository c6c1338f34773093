"""Custom COCO-format datasets: check a json and its images up front, then register them.

Detectron2's ``load_coco_json`` accepts many broken files quietly (it drops malformed polygons with
a warning, ignores annotations of unknown images) or fails late, in the middle of training, with
an error that does not say which file or annotation is at fault. :func:`validate_coco_json`
checks a whole dataset before training starts and raises one :class:`CocoDatasetError` that names
the json file and, for each problem, the image id / file name or annotation id.

    from solo_d2.data.coco_json import register_custom_coco
    num_classes = register_custom_coco("custom_train", "train.json", "images/")
    # then cfg.DATASETS.TRAIN = ("custom_train",); cfg.MODEL.SOLO.NUM_CLASSES = num_classes

Also refused, because Detectron2 would train or evaluate on wrong data without an error: a non-crowd
annotation whose mask rasterises to zero pixels (a zero-area or sub-pixel polygon, an RLE without
foreground: training drops it, COCO evaluation still counts it as ground truth), a ``bbox`` of
zero width or height on a non-empty mask (SOLO's scale comes from the box: the object would be
dropped from training), duplicate category names (COCO evaluation would merge their per-class
AP entries under one name), duplicated annotations (the same mask twice in one image: no grid
can tell them apart, and evaluation would expect two detections of one object), and an image whose json size is its stored size although its EXIF
orientation rotates it (the message says so and which size to write).

What Detectron2 already handles and is therefore accepted: category ids that are not 1..N (they
are mapped to 0..N-1 in sorted id order), images without annotations (left out of training, kept
for evaluation) and crowd annotations (``iscrowd: 1``; left out of training, "ignore" regions in
COCO evaluation).
"""
import json
import logging
import math
import os
from numbers import Number

import numpy as np

from ..utils.cli import UserError

__all__ = [
    "CocoDatasetError",
    "validate_coco_json",
    "register_custom_coco",
    "register_custom_datasets",
]

logger = logging.getLogger(__name__)

#: At most this many problems are listed in one error message.
MAX_LISTED_PROBLEMS = 20


class CocoDatasetError(UserError, ValueError):
    """A COCO-format dataset (json or images) that cannot be used; the message names the file
    and the offending image / annotation ids."""


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, Number) and not isinstance(v, bool) and math.isfinite(float(v))


def _rle_string_counts(s):
    """Run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``), or raise
    ValueError. pycocotools itself does not check the string and decodes garbage into random
    masks, hence this check."""
    c = np.frombuffer(s.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        raise ValueError("empty 'counts' string")
    if (c < 0).any() or (c > 63).any():
        raise ValueError("'counts' string has characters outside the RLE alphabet")
    more = (c & 0x20) != 0
    if more[-1]:
        raise ValueError("'counts' string is truncated")
    ends = np.flatnonzero(~more)
    starts = np.r_[0, ends[:-1] + 1]
    lengths = ends - starts + 1
    if lengths.max() > 7:
        raise ValueError("'counts' string has an out-of-range run length")
    group = np.repeat(np.arange(len(ends)), lengths)
    k = np.arange(c.size) - starts[group]
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    x = x - np.where((c[ends] & 0x10) != 0, 1 << (5 * lengths), 0)
    counts = x.copy()
    counts[1::2] = np.cumsum(x[1::2])  # counts[m] += counts[m - 2] for m > 2
    if len(x) > 2:
        counts[2::2] = np.cumsum(x[2::2])
    return counts


def _check_segmentation(segm, height, width):
    """A problem description (str) for a malformed ``segmentation``, or None if it is valid."""
    if isinstance(segm, list):
        if len(segm) == 0:
            return "empty 'segmentation'"
        if all(_is_number(v) for v in segm):
            return ("'segmentation' is a flat list of numbers; polygons must be a list of lists "
                    "[[x1, y1, x2, y2, ...], ...]")
        for j, poly in enumerate(segm):
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                return f"polygon {j} of 'segmentation' is not a list of finite numbers"
            if len(poly) < 6 or len(poly) % 2:
                return (f"polygon {j} of 'segmentation' has {len(poly)} coordinates; a polygon "
                        "needs an even number of coordinates, at least 6 (3 points)")
        return None
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            return f"RLE 'segmentation' has a bad 'size' {size!r}; expected [height, width]"
        if height is not None and width is not None and list(size) != [height, width]:
            return (f"RLE 'segmentation' has size {size}, but the image is "
                    f"[{height}, {width}] (height, width)")
        if isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts):
                return "uncompressed RLE 'counts' must be non-negative integers"
            total = sum(counts)
        elif isinstance(counts, str):
            try:
                run_lengths = _rle_string_counts(counts)
            except (ValueError, UnicodeEncodeError) as e:
                return f"compressed RLE 'counts' is malformed: {e}"
            if (run_lengths < 0).any():
                return "compressed RLE 'counts' is malformed: negative run length"
            total = int(run_lengths.sum())
        else:
            return f"RLE 'counts' must be a string or a list of integers, got {type(counts).__name__}"
        if total != size[0] * size[1]:
            return (f"RLE 'counts' cover {total} pixels, but 'size' {size} has "
                    f"{size[0] * size[1]}")
        return None
    return f"'segmentation' must be a list of polygons or an RLE dict, got {type(segm).__name__}"


def _oriented_image_size(path, with_orientation=False):
    """(width, height) of an image file after its EXIF orientation (as Detectron2 reads it);
    with ``with_orientation``, ``((width, height), orientation tag)``."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # pragma: no cover - broken EXIF: Detectron2 ignores it too
            orientation = 1
    size = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return (size, orientation) if with_orientation else size


def _mask_area(segm, height, width):
    """(number of pixels, compressed RLE ``counts`` bytes) of a well-formed ``segmentation``
    rasterised at (height, width) the way Detectron2 does (pycocotools ``frPyObjects``:
    ``polygons_to_bitmask`` for polygons, the RLE itself otherwise); equal masks have equal
    ``counts``, whatever their encoding."""
    import pycocotools.mask as mask_util

    if isinstance(segm, list):
        rles = mask_util.frPyObjects([[float(v) for v in p] for p in segm], height, width)
        rle = mask_util.merge(rles)
    else:
        counts = segm["counts"]
        if isinstance(counts, list):
            rle = mask_util.frPyObjects(segm, height, width)
        else:
            rle = {"size": list(segm["size"]), "counts": counts.encode("ascii")}
    return int(mask_util.area(rle)), rle["counts"]


def _check_image_file(path, check):
    """A problem (str) with the image file ``path``, or None. ``check``: "exists", "header" (PIL
    can identify it; returns its size too) or "decode" (the whole image decodes)."""
    if not os.path.isfile(path):
        return "file not found", None
    if check == "exists":
        return None, None
    try:
        size = _oriented_image_size(path)
        from PIL import Image

        from .image_io import to_8bit

        with Image.open(path) as im:
            if check == "decode":
                im.load()
                to_8bit(im, path)  # 32-bit / float images without an 8-bit scale: ValueError
            elif im.mode == "F":
                return ("a floating-point image (PIL mode 'F'): training and the demo read "
                        "8- or 16-bit images"), None
    except Exception as e:  # PIL raises many kinds: UnidentifiedImageError, OSError, ...
        return f"cannot read the image ({type(e).__name__}: {e})", None
    return None, size


def _fail(json_file, problems, what="problems"):
    listed = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(listed)
    msg = f"{json_file}: {len(problems)} {what}:\n  " + "\n  ".join(listed)
    if more:
        msg += f"\n  ... and {more} more"
    raise CocoDatasetError(msg)


def validate_coco_json(json_file, image_root, check_images="header", require_area=False):
    """Check a COCO instance-segmentation json and its images; raise on any problem.

    Checks: the file parses as json with ``images``, ``annotations`` and ``categories`` lists;
    categories have unique integer ids and unique string names; images have unique ids, a ``file_name`` that
    exists under ``image_root`` (and, with ``check_images`` "header" or "decode", can be read
    and has the json's ``height`` x ``width``); annotations have unique ids, an existing
    ``image_id`` and ``category_id``, a ``bbox`` of 4 numbers with w, h >= 0 and a well-formed
    ``segmentation`` (polygons: lists of an even number >= 6 of coordinates; RLE: ``size`` equal
    to the image's [height, width] and ``counts`` covering exactly height * width pixels), which
    is required unless the annotation is a crowd region; a non-crowd mask must cover at least one
    pixel when rasterised like Detectron2 does, and its ``bbox`` must then have a non-zero width
    and height. An EXIF-rotated image must have its rotated size in the json.

    Args:
        json_file (str): the COCO json.
        image_root (str): folder that the images' ``file_name`` are relative to.
        check_images (str): "exists" (only that each file exists), "header" (default: PIL
            identifies the file and its size matches; fast, does not decode pixels) or "decode"
            (every image is fully decoded: finds truncated files too; slower).
        require_area (bool): also require ``area`` in every annotation (COCO evaluation of
            the json needs it).

    Returns:
        dict: ``num_images``, ``num_annotations``, ``num_crowd``,
        ``num_images_without_annotations``, ``category_ids`` (sorted), ``thing_classes``
        (names in sorted id order, as Detectron2 maps them to 0..N-1) and ``num_classes``.

    Raises:
        CocoDatasetError: naming ``json_file`` and each offending image / annotation.
    """
    if check_images not in ("exists", "header", "decode"):
        raise ValueError(f"check_images must be 'exists', 'header' or 'decode', got {check_images!r}")
    json_file = str(json_file)
    if not os.path.isfile(json_file):
        raise CocoDatasetError(f"{json_file}: file not found")
    if not os.path.isdir(image_root):
        raise CocoDatasetError(f"{json_file}: image folder {image_root} not found")
    try:
        with open(json_file, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CocoDatasetError(f"{json_file}: not a valid json file ({e})") from e
    except OSError as e:
        raise CocoDatasetError(f"{json_file}: cannot read the file ({e})") from e
    if not isinstance(data, dict):
        raise CocoDatasetError(f"{json_file}: expected a json object with 'images', "
                               f"'annotations' and 'categories', got a {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoDatasetError(f"{json_file}: missing or invalid {key!r} (must be a list)")

    problems = []
    # Categories.
    cat_ids = []
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            problems.append(f"category #{i}: needs an integer 'id' and a string 'name', got {cat!r}")
            continue
        cat_ids.append(cat["id"])
    if not data["categories"]:
        problems.append("no categories")
    dup = sorted({c for c in cat_ids if cat_ids.count(c) > 1})
    if dup:
        problems.append(f"duplicate category ids {dup}")
    names = {}
    for cat in data["categories"]:
        if isinstance(cat, dict) and _is_int(cat.get("id")) and isinstance(cat.get("name"), str):
            names.setdefault(cat["name"], []).append(cat["id"])
    for name, ids in names.items():
        if len(ids) > 1:
            problems.append(
                f"duplicate category name {name!r} (category ids {sorted(ids)}): COCO evaluation "
                "would report one AP entry for them; give each category its own name, or merge "
                "them into one category"
            )
    if problems:
        _fail(json_file, problems)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    cat_set = set(cat_ids)

    # Images.
    images = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            problems.append(f"image #{i}: needs an integer 'id'")
            continue
        iid = img["id"]
        name = img.get("file_name")
        where = f"image id {iid}"
        if iid in images:
            problems.append(f"{where}: duplicate image id")
            continue
        h, w = img.get("height"), img.get("width")
        if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
            problems.append(f"{where} ({name}): 'height' and 'width' must be positive integers")
            h = w = None
        images[iid] = (h, w)
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: missing 'file_name'")
            continue
        path = os.path.join(image_root, name)
        problem, size = _check_image_file(path, check_images)
        if problem:
            problems.append(f"{where}: {path}: {problem}")
        elif size is not None and h is not None and size != (w, h):
            orientation = _oriented_image_size(path, with_orientation=True)[1]
            if orientation in (5, 6, 7, 8) and (size[1], size[0]) == (w, h):
                problems.append(
                    f"{where}: {path} is EXIF-rotated (orientation tag {orientation}): it is "
                    f"stored as {w}x{h} but displayed, and read by Detectron2, as "
                    f"{size[0]}x{size[1]} (width x height); the json's size must be the rotated "
                    f"one: \"width\": {size[0]}, \"height\": {size[1]} (and the annotations "
                    "drawn on the rotated image)")
            else:
                problems.append(f"{where}: {path} is {size[0]}x{size[1]} (width x height), but "
                                f"the json says {w}x{h}")

    # Annotations.
    ann_ids = set()
    num_crowd = 0
    with_anns = set()
    masks = {}  # (image id, RLE counts) -> annotation ids with that mask
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            problems.append(f"annotation #{i}: not an object")
            continue
        aid = ann.get("id")
        where = f"annotation id {aid}" if aid is not None else f"annotation #{i}"
        if not _is_int(aid):
            problems.append(f"{where}: needs an integer 'id'")
        elif aid in ann_ids:
            problems.append(f"{where}: duplicate annotation id")
        else:
            ann_ids.add(aid)
        iid = ann.get("image_id")
        if iid not in images:
            problems.append(f"{where}: image_id {iid!r} is not in 'images'")
            h = w = None
        else:
            where += f" (image id {iid})"
            h, w = images[iid]
            with_anns.add(iid)
        if ann.get("category_id") not in cat_set:
            problems.append(f"{where}: category_id {ann.get('category_id')!r} is not in "
                            f"'categories' (ids {sorted(cat_set)})")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            problems.append(f"{where}: 'iscrowd' must be 0 or 1, got {crowd!r}")
        num_crowd += crowd == 1
        if ann.get("ignore", 0):
            problems.append(f"{where}: 'ignore' is not supported by Detectron2; use 'iscrowd': 1")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)
                and bbox[2] >= 0 and bbox[3] >= 0):
            problems.append(f"{where}: 'bbox' must be [x, y, width, height] with width, height "
                            f">= 0, got {bbox!r}")
        if require_area and not _is_number(ann.get("area")):
            problems.append(f"{where}: missing 'area' (COCO evaluation needs it)")
        segm = ann.get("segmentation")
        if segm is None:
            if crowd != 1:
                problems.append(f"{where}: no 'segmentation' (instance segmentation needs a "
                                "mask for every non-crowd annotation)")
            continue
        problem = _check_segmentation(segm, h, w)
        if problem:
            problems.append(f"{where}: {problem}")
        elif crowd != 1 and h is not None and w is not None:
            pixels, counts = _mask_area(segm, h, w)
            if pixels:
                masks.setdefault((iid, counts), []).append(aid if aid is not None else f"#{i}")
            if pixels == 0:
                problems.append(
                    f"{where}: the 'segmentation' covers 0 pixels when rasterised at the image's "
                    f"{w}x{h} (a zero-area or sub-pixel polygon, or an RLE without foreground): "
                    "training would drop it while COCO evaluation counts it as an object; delete "
                    "it or fix the mask")
            elif isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox) \
                    and (bbox[2] == 0 or bbox[3] == 0):
                problems.append(
                    f"{where}: 'bbox' {bbox} has zero width or height but the mask has {pixels} "
                    "pixels: SOLO assigns an object to a level by its box, so it would be dropped "
                    "from training; write the mask's bounding box")
    for (iid, _), ids in masks.items():
        if len(ids) > 1:
            problems.append(
                f"annotation ids {ids} (image id {iid}): the same mask {len(ids)} times (duplicated "
                "annotations): they share every grid cell, so training keeps one and counts the "
                "others as lost, and COCO evaluation counts each as an object; keep one of them")
    if problems:
        _fail(json_file, problems)
    return {
        "num_images": len(images),
        "num_annotations": len(data["annotations"]),
        "num_crowd": int(num_crowd),
        "num_images_without_annotations": len(images) - len(with_anns),
        "category_ids": [c["id"] for c in cats],
        "thing_classes": [c["name"] for c in cats],
        "num_classes": len(cats),
    }


def register_custom_coco(name, json_file, image_root=None, check_images="header",
                         require_area=False):
    """Validate a COCO-format dataset (:func:`validate_coco_json`) and register it with
    Detectron2 as ``name`` (``register_coco_instances``); a dataset already registered under
    ``name`` is replaced.

    Args:
        name (str): dataset name for ``cfg.DATASETS.TRAIN`` / ``TEST``.
        json_file (str): the COCO json.
        image_root (str or None): folder of the images; default: the json's folder.
        check_images, require_area: see :func:`validate_coco_json`.

    Returns:
        int: the number of classes (for ``MODEL.SOLO.NUM_CLASSES``).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    json_file = os.path.abspath(str(json_file))
    image_root = os.path.abspath(str(image_root) if image_root else os.path.dirname(json_file))
    summary = validate_coco_json(json_file, image_root, check_images=check_images,
                                 require_area=require_area)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, json_file, image_root)
    # Known now, not only once the json is loaded: for check_num_classes and visualisation.
    MetadataCatalog.get(name).set(
        thing_classes=list(summary["thing_classes"]),
        thing_dataset_id_to_contiguous_id={c: i for i, c in enumerate(summary["category_ids"])},
    )
    logger.info(
        "Registered %s: %s (%d images, %d without annotations, %d annotations, %d crowd, "
        "%d classes)", name, json_file, summary["num_images"],
        summary["num_images_without_annotations"], summary["num_annotations"],
        summary["num_crowd"], summary["num_classes"])
    return summary["num_classes"]


def register_custom_datasets(train_json=None, train_images=None, val_json=None, val_images=None,
                             train_name="custom_train", val_name="custom_val",
                             check_images="header"):
    """Register a custom training and/or validation set; return the config options that use them.

    Returns:
        list[str]: ``opts`` for ``cfg.merge_from_list``: ``DATASETS.TRAIN`` / ``DATASETS.TEST``
        for the given sets and ``MODEL.SOLO.NUM_CLASSES``; empty if no json is given. A training
        set without a validation set gives ``DATASETS.TEST ()`` (evaluation skipped, with a
        warning), never the config's test sets, whose classes are not the custom ones.

    Raises:
        CocoDatasetError: a bad dataset, or training and validation sets whose categories differ.
    """
    opts = []
    classes = {}
    if train_json:
        register_custom_coco(train_name, train_json, train_images, check_images=check_images)
        opts += ["DATASETS.TRAIN", f"('{train_name}',)"]
        classes[train_json] = _categories(train_name)
    if val_json:
        register_custom_coco(val_name, val_json, val_images, check_images=check_images,
                             require_area=True)
        opts += ["DATASETS.TEST", f"('{val_name}',)"]
        classes[val_json] = _categories(val_name)
    elif train_json:
        # The config's test sets (e.g. shapes_val) have other classes: evaluating the custom
        # model on them would report a meaningless AP (and generate the shapes dataset).
        logger.warning(
            "--train-json without --val-json: no validation set, so evaluation is skipped "
            "(DATASETS.TEST = ()); give --val-json to evaluate during and after training")
        opts += ["DATASETS.TEST", "()"]
    if len(classes) == 2 and classes[train_json] != classes[val_json]:
        raise CocoDatasetError(
            f"{train_json} and {val_json} have different categories "
            f"({classes[train_json]} vs {classes[val_json]}); they must have the same ids and names")
    if classes:
        opts += ["MODEL.SOLO.NUM_CLASSES", str(len(next(iter(classes.values()))))]
    return opts


def _categories(name):
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(name)
    id_map = meta.thing_dataset_id_to_contiguous_id
    return [(cid, meta.thing_classes[i]) for cid, i in sorted(id_map.items())]
