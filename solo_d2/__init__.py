"""solo_d2: SOLO and Decoupled SOLO instance segmentation for Detectron2.

Importing this package registers the ``SOLO`` meta-architecture, the SOLO heads
(``MODEL.SOLO.HEAD_TYPE``) and the built-in ``shapes_train`` / ``shapes_val`` datasets (generated
lazily on first use). Build a cfg with :func:`get_solo_cfg` (or add the config keys to your own
with :func:`add_solo_config`); predict with :class:`SOLOPredictor`; train with
:class:`solo_d2.engine.Trainer`.
"""
__version__ = "0.1.0"  # the only place the version is written (setup.cfg reads it)

from . import modeling  # noqa: F401  (registers META_ARCH "SOLO" and the heads)
from .config import add_solo_config, get_solo_cfg, resolve_device
from .data import register_shapes_datasets
from .predictor import SOLOPredictor
from . import inference  # noqa: F401,E402  (tiled inference, COCO results: solo_d2.inference)

register_shapes_datasets()  # shapes_train / shapes_val; nothing is generated until first use

__all__ = [
    "add_solo_config",
    "get_solo_cfg",
    "resolve_device",
    "modeling",
    "SOLOPredictor",
    "register_shapes_datasets",
]
