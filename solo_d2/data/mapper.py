"""Detectron2's ``DatasetMapper``, with errors that name the image and no same-size resizes.

- Detectron2's own mapper lets e.g. PIL's "image file is truncated" or "cannot identify image
  file <_io.BufferedReader ...>" through without the file name, from the middle of a training
  run; this one re-raises any error of the mapping as :class:`ImageLoadError` naming the file and
  image id.
- images are read with :func:`solo_d2.data.image_io.read_image`: 16-bit grayscale PNGs are scaled
  to 8 bits (Detectron2's reader clips them to white).
- Detectron2's ``ResizeShortestEdge`` resizes an image that already has the output size to that
  same size, through PIL, and every instance mask with it. This mapper's resize skips that: the
  pixels are the same and the random stream (the choice of size) is unchanged.
"""
import copy

import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .image_io import read_image

__all__ = ["ImageLoadError", "FileNamingDatasetMapper", "ResizeShortestEdgeOrKeep"]


class ImageLoadError(RuntimeError):
    """An error while reading or transforming one image of a dataset; names the file."""


class ResizeShortestEdgeOrKeep(T.ResizeShortestEdge):
    """``ResizeShortestEdge`` that gives a ``NoOpTransform`` where the output size equals the
    input's (e.g. the shapes dataset's 256x256 images at ``MIN_SIZE_TRAIN (256,)``). Same
    arguments and random choices as Detectron2's."""

    def get_transform(self, image):
        t = super().get_transform(image)
        if isinstance(t, T.ResizeTransform) and (t.h, t.w) == (t.new_h, t.new_w):
            return T.NoOpTransform()
        return t


def _keep_same_size(aug):
    if type(aug) is not T.ResizeShortestEdge:
        return aug
    out = ResizeShortestEdgeOrKeep.__new__(ResizeShortestEdgeOrKeep)
    out.__dict__.update(aug.__dict__)
    return out


class FileNamingDatasetMapper(DatasetMapper):
    """``DatasetMapper`` (same arguments) whose errors name the file and the image id, and whose
    ``ResizeShortestEdge`` skips same-size resizes (:class:`ResizeShortestEdgeOrKeep`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.augmentations = T.AugmentationList(
            [_keep_same_size(a) for a in self.augmentations.augs]
        )

    def map(self, dataset_dict):
        """``DatasetMapper.__call__`` with solo_d2's image reader (16-bit images scaled, not
        clipped). SOLO uses no semantic segmentation (``sem_seg_file_name`` is not read) and no
        precomputed proposals (``MODEL.LOAD_PROPOSALS`` is refused)."""
        if self.proposal_topk is not None:
            raise ValueError("MODEL.LOAD_PROPOSALS: SOLO uses no precomputed proposals")
        dataset_dict = copy.deepcopy(dataset_dict)
        dataset_dict.pop("sem_seg_file_name", None)
        image = read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict

    def __call__(self, dataset_dict):
        try:
            return self.map(dataset_dict)
        except Exception as e:
            name = dataset_dict.get("file_name", "<no file_name>")
            raise ImageLoadError(
                f"{name} (image id {dataset_dict.get('image_id', '?')}): cannot load this "
                f"image: {type(e).__name__}: {e}"
            ) from e
