"""``evaluate_segm``: COCO mask AP of results against a ground-truth json (pycocotools' COCOeval).

With more than COCO's standard 100 detections per image (large tiled images), Detectron2's
``COCOevalMaxDets`` summarises at ``max_dets`` (pycocotools' own summary reads AP at 100).
"""
import contextlib
import io
from typing import Dict, List, Optional, Sequence, Union

from detectron2.evaluation.coco_evaluation import COCOevalMaxDets
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["evaluate_segm", "METRIC_NAMES"]

#: The names of COCOeval's 12 summary figures, in its order (AR* at the last max detections).
METRIC_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR", "ARs", "ARm", "ARl"]


def evaluate_segm(gt: Union[str, COCO], results: List[dict], max_dets: int = 100,
                  iou_type: str = "segm", image_ids: Optional[Sequence[int]] = None,
                  verbose: bool = False) -> Dict[str, float]:
    """COCO metrics (percent; -1 where COCOeval has no data, e.g. no small objects) of
    ``results`` (COCO results, as :func:`~solo_d2.inference.instances_to_coco_results` writes)
    against ``gt`` (a json path or a ``COCO``).

    Args:
        max_dets: detections per image counted, from the highest score (COCO's standard: 100).
        image_ids: the images evaluated (default: all of ``gt``'s; an image without results
            counts its objects as missed).
        verbose: print COCOeval's summary table.
    """
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = gt if isinstance(gt, COCO) else COCO(gt)
        if not results:
            return {k: 0.0 for k in METRIC_NAMES}
        coco_dt = coco_gt.loadRes(results)
        cls = COCOeval if max_dets == 100 else COCOevalMaxDets
        ev = cls(coco_gt, coco_dt, iou_type)
        ev.params.maxDets = [1, 10, int(max_dets)]
        if image_ids is not None:
            ev.params.imgIds = sorted(set(int(i) for i in image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) * 100 if v >= 0 else -1.0 for k, v in zip(METRIC_NAMES, ev.stats)}
