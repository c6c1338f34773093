"""solo_d2: SOLO and Decoupled SOLO instance segmentation for Detectron2.

Importing this package registers the ``SOLO`` meta-architecture, the SOLO heads
(``MODEL.SOLO.HEAD_TYPE``) and the built-in ``shapes_train`` / ``shapes_val`` datasets (generated
lazily on first use). Add the config keys with :func:`add_solo_config`.
"""
from . import modeling  # noqa: F401  (registers META_ARCH "SOLO" and the heads)
from .config import add_solo_config
from .data import register_shapes_datasets
from .predictor import SOLOPredictor

register_shapes_datasets()  # shapes_train / shapes_val; nothing is generated until first use

__all__ = ["add_solo_config", "modeling", "SOLOPredictor", "register_shapes_datasets"]
__version__ = "0.1.0"
