"""Checks of a cfg against the registered datasets."""
from detectron2.data import MetadataCatalog

__all__ = ["check_num_classes"]


def check_num_classes(cfg, dataset_names) -> None:
    """Raise ``ValueError`` if ``MODEL.SOLO.NUM_CLASSES`` differs from the number of
    ``thing_classes`` of one of ``dataset_names`` (datasets whose classes are not known yet are
    skipped)."""
    n = cfg.MODEL.SOLO.NUM_CLASSES
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) != n:
            raise ValueError(
                f"MODEL.SOLO.NUM_CLASSES = {n} but dataset {name!r} has {len(classes)} classes "
                f"({list(classes)[:5]}{'...' if len(classes) > 5 else ''}); set "
                f"MODEL.SOLO.NUM_CLASSES {len(classes)}"
            )
