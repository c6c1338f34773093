"""The training mapper: Detectron2's ``DatasetMapper`` output, without same-size resizes."""
import numpy as np
import pytest
import torch
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T

from helpers import tiny_cfg, write_dataset
from solo_d2.data.mapper import FileNamingDatasetMapper, ResizeShortestEdgeOrKeep


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("mapper")
    same = write_dataset(root, "mapper_same", 3, seed=3)  # 128x128: the tiny config's size
    other = write_dataset(root, "mapper_other", 2, seed=4, h=96, w=112)  # resized to 110 x 128 (MAX_SIZE 128)
    return same + other


@pytest.mark.parametrize("is_train", [True, False])
def test_same_output_as_detectron2s_mapper(images, is_train):
    cfg = tiny_cfg()
    ours, theirs = FileNamingDatasetMapper(cfg, is_train), DatasetMapper(cfg, is_train)
    assert any(isinstance(a, ResizeShortestEdgeOrKeep) for a in ours.augmentations.augs)
    for d in images:
        np.random.seed(0)  # the same flips
        a = ours(dict(d))
        np.random.seed(0)
        b = theirs(dict(d))
        assert torch.equal(a["image"], b["image"]), d["file_name"]
        if is_train:
            ia, ib = a["instances"], b["instances"]
            assert torch.equal(ia.gt_classes, ib.gt_classes)
            assert torch.equal(ia.gt_masks.tensor, ib.gt_masks.tensor)
            assert torch.equal(ia.gt_boxes.tensor, ib.gt_boxes.tensor)
    assert tuple(a["image"].shape) == (3, 110, 128)  # the 96x112 images are still resized (max 128)


def test_same_size_gives_no_op_and_other_sizes_resize():
    aug = ResizeShortestEdgeOrKeep((128,), max_size=1000, sample_style="choice")
    assert isinstance(aug.get_transform(np.zeros((128, 160, 3), np.uint8)), T.NoOpTransform)
    t = aug.get_transform(np.zeros((64, 80, 3), np.uint8))
    assert isinstance(t, T.ResizeTransform) and (t.new_h, t.new_w) == (128, 160)
