"""Datasets of solo_d2: the built-in synthetic instance-segmentation dataset "shapes".

Importing this package generates nothing and registers nothing; call
:func:`register_shapes_datasets` to register ``shapes_train`` / ``shapes_val`` (generated lazily,
on the first ``DatasetCatalog.get``). Custom COCO-format datasets: :mod:`solo_d2.data.coco_json`
(``validate_coco_json``, ``register_custom_coco``). The names below are loaded from :mod:`solo_d2.data.shapes`
on first access (PEP 562), so that ``python -m solo_d2.data.shapes`` does not import the module
twice.
"""
import importlib

__all__ = [
    "SHAPES_CLASSES",
    "default_shapes_root",
    "generate_shapes_dataset",
    "register_shapes_datasets",
    "render_shapes_image",
]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module(".shapes", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
