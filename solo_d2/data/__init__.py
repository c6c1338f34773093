"""Datasets of solo_d2: the built-in synthetic instance-segmentation dataset "shapes"
(:mod:`.shapes`), custom COCO-format datasets (:mod:`.coco_json`: ``validate_coco_json``,
``register_custom_coco``), the dataset mapper (:mod:`.mapper`), the resumable training sampler
(:mod:`.samplers`) and the cfg-against-dataset checks (:mod:`.checks`).

Importing this package generates nothing and registers nothing; call
:func:`register_shapes_datasets` to register ``shapes_train`` / ``shapes_val`` (generated lazily,
on the first ``DatasetCatalog.get``). The generator's command line is ``tools/generate_shapes.py``.
"""
from .shapes import (
    SHAPES_CLASSES,
    default_shapes_root,
    generate_shapes_dataset,
    register_shapes_datasets,
    render_shapes_image,
)

__all__ = [
    "SHAPES_CLASSES",
    "default_shapes_root",
    "generate_shapes_dataset",
    "register_shapes_datasets",
    "render_shapes_image",
]
