"""The conversion core: errors, what a converted checkpoint holds, reading source files safely,
the registry of source layouts and the layout-independent conversion steps.

A source layout (one module of this package each) is a :class:`Layout`: ``detect(keys)`` says
whether a state dict is in that layout and ``rename(sd)`` gives its tensors in solo_d2 names
(see :mod:`solo_d2.conversion`). :func:`convert_state_dict` then describes what was converted
(:mod:`.describe`) and checks it is complete.
"""
import os
import pickle
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

#: ``__author__`` written into converted files.
AUTHOR = "solo_d2 convert_weights"


class ConversionError(ValueError):
    """A checkpoint that cannot be converted exactly; the message names the key(s) at fault."""


@dataclass
class ConvertedCheckpoint:
    """A state dict in solo_d2 names and what it holds.

    ``head`` is None for a backbone-only (torchvision) source. ``num_grids`` etc. are None then.
    """

    state_dict: Dict[str, torch.Tensor]
    layout: str
    head: Optional[str]
    depth: int
    stem_channels: int
    res2_channels: int
    bottleneck_channels: Optional[int] = None
    #: res2..res5: whether the stage's 3x3 convs are deformable (``conv2.conv_offset``)
    deform_stages: Tuple[bool, bool, bool, bool] = (False, False, False, False)
    #: the backbone's deformable convs are DCN v2 (27-channel ``conv_offset``)
    deform_modulated: bool = False
    fpn_channels: Optional[int] = None
    num_classes: Optional[int] = None
    num_grids: Optional[List[int]] = None
    conv_channels: Optional[int] = None
    num_stacked_convs: Optional[int] = None
    num_deformable_convs: int = 0
    #: the head's deformable convs (towers, SOLOv2's mask feature branch) are DCN v2
    head_deform_modulated: bool = False
    #: SOLOv2 only: every conv of the mask feature branch is deformable
    mask_feature_deformable: bool = False
    norm: str = "GN"
    #: SOLOv2 only: E, the mask feature branch's channels, its levels, the dynamic kernel size
    mask_feature_dim: Optional[int] = None
    mask_feature_channels: Optional[int] = None
    mask_feature_num_levels: Optional[int] = None
    dynamic_kernel_size: Optional[int] = None
    #: the backbone's style, which decides the config's input and ResNet settings
    #: (:data:`solo_d2.conversion.configs.INPUT_STYLES`): "pytorch" (torchvision ResNets) or
    #: "caffe" (Detectron2's MSRA ResNets)
    style: str = "pytorch"


# ---------------------------------------------------------------------------------------------
# Reading the source file
# ---------------------------------------------------------------------------------------------
def load_source_checkpoint(path: str, unsafe_load: bool = False):
    """``torch.load`` a checkpoint: ``weights_only=True`` unless ``unsafe_load``; a ``.pkl``
    (Detectron2 / Caffe2 model zoo) with :class:`NumpyOnlyUnpickler` unless ``unsafe_load``.

    A path that is not a checkpoint file (missing, a folder, empty, truncated, neither a zip nor
    a pickle) raises :class:`solo_d2.checkpoint.CheckpointFileError` saying which. A well-formed
    file that needs arbitrary unpickling (mmengine checkpoints keep Python objects in ``meta``)
    raises :class:`ConversionError` saying that ``--unsafe-load`` is needed, for a file the user
    trusts.
    """
    from ..checkpoint import check_checkpoint_file, needs_unsafe_unpickling, unreadable_checkpoint_error

    check_checkpoint_file(path)
    if path.endswith(".pkl"):  # Detectron2 / Caffe2 model zoo: a pickle of numpy arrays
        with open(path, "rb") as f:
            if unsafe_load:
                return pickle_weights(pickle.load(f, encoding="latin1"))
            try:
                return pickle_weights(load_numpy_pickle(f))
            except pickle.UnpicklingError as e:
                raise ConversionError(
                    f"{path} holds more than numpy arrays ({e}: unpickling it could run code); if "
                    "you trust this file, rerun with --unsafe-load") from None
            except EOFError:
                raise ConversionError(f"{path} is truncated (the pickle ends early)") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe_load)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, OSError
        if unsafe_load or not needs_unsafe_unpickling(e):
            raise unreadable_checkpoint_error(path, e) from None
        first = str(e).strip().splitlines()
        detail = next((l.strip() for l in first if "GLOBAL" in l or "global" in l),
                      first[0] if first else "")
        raise ConversionError(
            f"{path} needs arbitrary unpickling to load (it holds Python objects, which can run "
            f"code: {detail[:200]}); if you trust this file, rerun with --unsafe-load") from None


#: The only globals a weights pickle may name: numpy arrays, dtypes, scalars and plain containers
#: (what Detectron2 / Caffe2 model-zoo ``.pkl`` files hold).
_NUMPY_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # Python 2 pickles of bytes, read with encoding="latin1"
    ("__builtin__", "set"),
    ("builtins", "set"),
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays, numpy dtypes / scalars and plain containers
    (dict, list, tuple, set, str, numbers) and nothing else: any other global (a function or
    class the pickle would call, which can run code) raises ``pickle.UnpicklingError`` naming
    it (``global 'builtins.exec' is not allowed``)."""

    def find_class(self, module, name):
        if (module, name) in _NUMPY_PICKLE_GLOBALS or (
                module in ("numpy", "numpy.dtypes") and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def load_numpy_pickle(f):
    """Unpickle the open binary file ``f`` with :class:`NumpyOnlyUnpickler` (``latin1`` strings,
    as Python 2 pickles of the Caffe2 model zoo need)."""
    return NumpyOnlyUnpickler(f, encoding="latin1").load()


def pickle_weights(data) -> Dict[str, object]:
    """The weights of an unpickled Detectron2 / Caffe2 ``.pkl``, read as Detectron2 reads them:
    ``data["model"]`` of a Detectron2 file (``"model"`` and ``"__author__"``), else
    ``data["blobs"]`` or ``data`` itself without Caffe2's ``*_momentum`` blobs; numpy arrays
    become tensors."""
    import numpy as np

    if not isinstance(data, dict):
        raise ConversionError(f"a .pkl checkpoint must hold a dict, got {type(data).__name__}")
    if "model" in data and "__author__" in data:
        data = data["model"]
    elif "blobs" in data:
        data = data["blobs"]
    if not isinstance(data, dict):
        raise ConversionError(f"the weights of a .pkl checkpoint must be a dict, got {type(data).__name__}")
    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            for k, v in data.items() if not k.endswith("_momentum")}


def extract_state_dict(obj) -> Dict[str, torch.Tensor]:
    """The parameter dict of a loaded checkpoint: ``obj["state_dict"]`` (mmcv / mmengine),
    ``obj["model"]`` (Detectron2) or ``obj`` itself (a bare state dict)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(
            "unknown layout: the checkpoint is not a state dict (nor a dict with 'state_dict' "
            f"or 'model'), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"unknown layout: entries that are not tensors: {bad[:5]}")
    # DataParallel / DDP wrappers
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


# ---------------------------------------------------------------------------------------------
# Messages and completeness checks shared by the layouts and the description
# ---------------------------------------------------------------------------------------------
def _summarize(keys: List[str], limit: int = 10) -> str:
    """Keys named in full when few, else grouped with indices as '*' ('head.mask_preds.*.x.weight
    (5)')."""
    if len(keys) <= limit:
        return str(keys)
    groups: Dict[str, int] = {}
    for k in keys:
        g = re.sub(r"\.\d+(?=\.)", ".*", k)
        groups[g] = groups.get(g, 0) + 1
    items = [f"{g} ({n})" if n > 1 else g for g, n in groups.items()]
    return "[" + ", ".join(items[:limit]) + (", ..." if len(items) > limit else "") + "]"


def _missing(prefix_keys: List[str], sd) -> None:
    missing = [k for k in prefix_keys if k not in sd]
    if missing:
        raise ConversionError(f"missing keys ({len(missing)}): {_summarize(missing)}")



# ---------------------------------------------------------------------------------------------
# Source layouts
# ---------------------------------------------------------------------------------------------
#: (regex, function of the match giving the solo_d2 name) pairs
Rules = List[Tuple[str, Callable[[re.Match], str]]]


class Layout:
    """One source layout: how to recognise its keys and rename them to solo_d2's.

    Subclasses set ``name`` (what :func:`detect_layout` returns and converted files record),
    ``description`` (its keys, for the unknown-layout error) and ``backbone_only`` (its files
    hold a ResNet and nothing else) and ``style`` (its backbone's style), and implement :meth:`detect` and :meth:`rename`.
    """

    name = ""
    description = ""
    backbone_only = False
    #: the style of its ResNets: "pytorch" or "caffe" (:data:`.configs.INPUT_STYLES`)
    style = "pytorch"

    def detect(self, keys: List[str]) -> bool:
        """Whether a state dict with these keys is in this layout."""
        raise NotImplementedError

    def rename(self, sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, bool]]:
        """``sd``'s tensors under solo_d2 names, and for each solo_d2 head module
        (``cate_tower``, ``mask_feature`` ...) whether it has norm layers.

        ``sd`` comes without BatchNorm ``num_batches_tracked`` counters and mmengine
        ``data_preprocessor.*`` entries. Raises :class:`ConversionError` naming the keys that no
        rule maps.
        """
        raise NotImplementedError


#: the registered layouts, in the order they are tried
_LAYOUTS: List[Layout] = []


def register_layout(layout: Layout) -> Layout:
    """Add a layout to those :func:`detect_layout` tries (after the ones already there)."""
    if any(l.name == layout.name for l in _LAYOUTS):
        raise ValueError(f"a layout named {layout.name!r} is registered already")
    _LAYOUTS.append(layout)
    return layout


def get_layout(name: str) -> Layout:
    """The registered layout called ``name``."""
    for layout in _LAYOUTS:
        if layout.name == name:
            return layout
    raise KeyError(f"no layout {name!r}; known: {[l.name for l in _LAYOUTS]}")


class Renamer:
    """Collects renamed tensors (float32 copies of floating point ones) and the source keys no
    rule maps; two source keys for one solo_d2 name are an error."""

    def __init__(self):
        self.out: Dict[str, torch.Tensor] = {}
        self.leftover: List[str] = []

    def put(self, src_key: str, new_key: str, value: torch.Tensor) -> None:
        if new_key in self.out:
            raise ConversionError(f"two source keys map to {new_key!r} (one is {src_key!r})")
        self.out[new_key] = value.detach().clone().float() if value.is_floating_point() else value.clone(
        )

    def by_rules(self, key: str, value: torch.Tensor, rules: Rules) -> None:
        """Rename ``key`` with the first matching rule, or record it as leftover."""
        for pattern, repl in rules:
            m = re.match(pattern, key)
            if m:
                self.put(key, repl(m), value)
                return
        self.leftover.append(key)

    def result(self) -> Dict[str, torch.Tensor]:
        """The renamed tensors; :class:`ConversionError` naming the leftover keys if any."""
        if self.leftover:
            raise ConversionError(
                f"leftover keys that no rule maps ({len(self.leftover)}): "
                f"{_summarize(sorted(self.leftover))}")
        return self.out


def detect_layout(sd: Dict[str, torch.Tensor]) -> str:
    """The name of the registered layout of ``sd`` (``"mmdet"``, ``"official"``, ...);
    :class:`ConversionError` otherwise."""
    keys = list(sd)
    for layout in _LAYOUTS:
        if layout.detect(keys):
            return layout.name
    if any(k.startswith("backbone.bottom_up.")
           for k in sd) or any(k.startswith("head.") for k in sd):
        raise ConversionError(
            "unknown layout: this looks like a solo_d2 / Detectron2 checkpoint already (keys "
            "'backbone.bottom_up.*' / 'head.*'); load it directly with MODEL.WEIGHTS")
    sample = sorted(sd)[:5]
    raise ConversionError(
        "unknown layout: expected " + ", ".join(l.description for l in _LAYOUTS[:-1]) +
        f" or {_LAYOUTS[-1].description}; first keys: {sample}")


def convert_state_dict(sd: Dict[str, torch.Tensor]) -> ConvertedCheckpoint:
    """Rename a source state dict to solo_d2 names and describe it.

    Raises :class:`ConversionError` for an unknown layout, for keys that no rule maps (named),
    and for an incomplete backbone / head (the missing parts named). Tensors are kept as they
    are (float32 copies), except BatchNorm ``num_batches_tracked`` counters and mmengine's
    ``data_preprocessor.*`` buffers, which are dropped, and what a layout drops (torchvision's
    ``fc.*``).
    """
    from .describe import describe_backbone, describe_head, describe_neck

    layout = get_layout(detect_layout(sd))
    sd = {k: v for k, v in sd.items()
          if not k.endswith("num_batches_tracked") and not k.startswith("data_preprocessor.")}
    out, has_norm = layout.rename(sd)
    info = describe_backbone(out)
    result = ConvertedCheckpoint(state_dict=out, layout=layout.name, head=None, style=layout.style,
                                 **info)
    if not layout.backbone_only:
        describe_neck(out, result)
        describe_head(out, result, has_norm)
    return result
