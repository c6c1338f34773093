"""Export of :class:`~solo_d2.deploy.SOLODeployModel` to ``torch.export`` (``model.pt2``) and ONNX
(``model.onnx``), dynamic in height and width unless a static size is asked for.

The ONNX file carries what a runner needs to prepare an image without the config, as
``metadata_props`` (:func:`deploy_metadata`): the input format, the test resize, the size
bounds and the class names.
"""
import json
import os
from typing import Dict, Optional, Sequence, Tuple

import torch

from .deploy_model import SOLODeployModel

__all__ = [
    "INPUT_NAMES", "OUTPUT_NAMES", "size_bounds", "dynamic_shapes", "deploy_metadata",
    "export_torch", "export_onnx", "sort_stable_onnx",
]

INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["masks", "scores", "classes", "boxes"]
#: the largest height / width a dynamic export accepts
MAX_SIZE = 4096


def size_bounds(wrapper: SOLODeployModel) -> Tuple[int, int]:
    """(min, max) height and width of a dynamic export: at least two size-divisibility blocks
    and one pixel (smaller inputs make the coarsest feature map 1 pixel wide, a size the
    exporter cannot keep symbolic)."""
    return 2 * wrapper.size_divisibility + 1, MAX_SIZE


def dynamic_shapes(wrapper: SOLODeployModel):
    lo, hi = size_bounds(wrapper)
    height = torch.export.Dim("height", min=lo, max=hi)
    width = torch.export.Dim("width", min=lo, max=hi)
    return {"image": {1: height, 2: width}}


def check_sample(wrapper: SOLODeployModel, sample: torch.Tensor, static: bool):
    if sample.dtype != torch.uint8 or sample.dim() != 3 or sample.shape[0] != 3:
        raise ValueError(
            f"export sample must be a (3, H, W) uint8 tensor, got {tuple(sample.shape)} {sample.dtype}"
        )
    lo, hi = size_bounds(wrapper)
    if not static and not all(lo <= s <= hi for s in sample.shape[1:]):
        raise ValueError(
            f"export sample of size {tuple(sample.shape[1:])}: a dynamic export needs H and W "
            f"in [{lo}, {hi}]"
        )


def export_torch(wrapper: SOLODeployModel, sample: torch.Tensor, static: bool = False):
    """``torch.export`` of ``wrapper`` traced on ``sample`` ((3, H, W) uint8); H and W dynamic
    (:func:`size_bounds`) unless ``static``. Returns the ``ExportedProgram``."""
    check_sample(wrapper, sample, static)
    wrapper.eval()
    with torch.no_grad():
        # Deferred asserts: the stride reasoning of broadcasting ops asks whether 1 is a multiple
        # of a symbolic stride (Mod(1, 1024 * w) != 0, true for every allowed size), which the
        # exporter cannot prove; as a runtime check it costs nothing and keeps W dynamic.
        return torch.export.export(
            wrapper, (sample,), dynamic_shapes=None if static else dynamic_shapes(wrapper),
            strict=False, prefer_deferred_runtime_asserts_over_guards=True,
        )


def sort_stable_onnx(self, dim: int = -1, descending: bool = False, stable: bool = True):
    """ONNX translation of ``aten.sort.stable`` (the exporter has none): ``TopK`` over the whole
    dimension, which the ONNX specification makes stable (ties keep the lower index first)."""
    from onnxscript import opset18 as op

    k = op.Shape(self, start=dim, end=None if dim == -1 else dim + 1)
    return op.TopK(self, k, axis=dim, largest=descending, sorted=True)


def export_onnx(
    wrapper: SOLODeployModel,
    sample: torch.Tensor,
    path: str,
    static: bool = False,
    metadata: Optional[Dict[str, str]] = None,
    exported_program=None,
) -> str:
    """Export ``wrapper`` to the ONNX file ``path`` with the dynamo exporter (from
    ``exported_program`` when given, else from a new :func:`export_torch`); inputs and outputs
    are named :data:`INPUT_NAMES` / :data:`OUTPUT_NAMES`; ``metadata`` goes to the file's
    ``metadata_props``. The file is checked with ``onnx.checker``. Returns ``path``."""
    import onnx

    ep = exported_program if exported_program is not None else export_torch(wrapper, sample, static)
    program = torch.onnx.export(
        ep,
        (sample,),
        dynamo=True,
        input_names=INPUT_NAMES,
        output_names=OUTPUT_NAMES,
        custom_translation_table={torch.ops.aten.sort.stable: sort_stable_onnx},
        verbose=False,
    )
    proto = program.model_proto
    for k, v in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, str(v)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx.save(proto, path)
    onnx.checker.check_model(path)
    return path


def deploy_metadata(cfg, class_names: Optional[Sequence[str]] = None, static_size=None,
                    input_bounds: Optional[Tuple[int, int]] = None) -> Dict[str, str]:
    """What a runner needs from the config, as strings: ``input_format``, ``min_size_test``,
    ``max_size_test`` (Detectron2's ``ResizeShortestEdge`` at test time), ``static_size``
    ("H,W" or ""), ``class_names`` (JSON list), ``num_classes`` and, given ``input_bounds``
    (:func:`size_bounds`), ``min_input_size`` / ``max_input_size`` (the sides a dynamic export
    accepts)."""
    names = list(class_names) if class_names else [str(i) for i in range(cfg.MODEL.SOLO.NUM_CLASSES)]
    bounds = {}
    if input_bounds is not None:
        bounds = {"min_input_size": str(int(input_bounds[0])), "max_input_size": str(int(input_bounds[1]))}
    return {**bounds,
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": str(int(cfg.INPUT.MIN_SIZE_TEST)),
        "max_size_test": str(int(cfg.INPUT.MAX_SIZE_TEST)),
        "static_size": ",".join(str(int(s)) for s in static_size) if static_size else "",
        "class_names": json.dumps(names),
        "num_classes": str(int(cfg.MODEL.SOLO.NUM_CLASSES)),
        "mask_format": "bool (N, H, W) at the input size",
    }
