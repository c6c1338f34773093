"""Exported SOLO models (ONNX Runtime session, ``torch.export`` program) as Detectron2 models:
``list[dict]`` in, ``[{"instances": Instances}]`` out, for ``inference_on_dataset`` and Detectron2's
evaluators (``tools/deploy/export_model.py --run-eval``)."""
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances

from ..modeling.layers import masks_to_boxes

__all__ = ["ExportedSOLO", "onnx_runner", "torch_export_runner"]

Runner = Callable[[torch.Tensor], tuple]


def onnx_runner(path: str, threads: int = 0) -> Runner:
    """A function (3, H, W) uint8 tensor -> (masks, scores, classes, boxes) tensors that runs the
    ONNX file ``path`` in ONNX Runtime on the CPU (``threads`` intra-op threads; 0: its
    default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def run(image: torch.Tensor):
        outs = session.run(None, {"image": image.cpu().numpy()})
        return tuple(torch.from_numpy(np.asarray(o)) for o in outs)

    return run


def torch_export_runner(path: str) -> Runner:
    """The same for a ``torch.export`` file (``model.pt2``)."""
    module = torch.export.load(path).module()

    def run(image: torch.Tensor):
        with torch.no_grad():
            return module(image.cpu())

    return run


class ExportedSOLO:
    """An exported SOLO model behind Detectron2's model interface (inference only).

    Input: Detectron2's ``list[dict]`` with ``"image"``, a (3, H, W) tensor of 0..255 values in
    the exported model's ``INPUT.FORMAT`` (already resized by the test transform, as
    Detectron2's test loader gives it), and optionally ``"height"``/``"width"``, the output size.
    Output: ``[{"instances": Instances}]`` with ``pred_masks`` (R, height, width) bool,
    ``scores``, ``pred_classes`` and ``pred_boxes``. The exported masks are binary at the input
    size; for another output size they are resized bilinearly and thresholded at 0.5 (the eager
    model resizes its soft masks instead, so masks may differ by a pixel along their edges).
    """

    def __init__(self, run: Runner):
        self.run = run

    def eval(self):  # what inference_on_dataset calls on a model
        return self

    def __call__(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        results = []
        for x in batched_inputs:
            image = x["image"]
            if image.dtype != torch.uint8:
                image = image.round().clamp(0, 255).to(torch.uint8)
            h, w = image.shape[-2:]
            masks, scores, classes, boxes = self.run(image)
            out_h, out_w = int(x.get("height", h)), int(x.get("width", w))
            masks = torch.as_tensor(masks).bool()
            if (out_h, out_w) != (h, w):
                masks = F.interpolate(masks[None].float(), size=(out_h, out_w), mode="bilinear")[0] > 0.5
                boxes = masks_to_boxes(masks)
            inst = Instances((out_h, out_w))
            inst.pred_masks = masks
            inst.scores = torch.as_tensor(scores).float()
            inst.pred_classes = torch.as_tensor(classes).long()
            inst.pred_boxes = Boxes(torch.as_tensor(boxes).float())
            results.append({"instances": inst})
        return results
