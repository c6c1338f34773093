"""The box-limited mask paste gives exactly the full-image paste's bool masks."""
import pytest
import torch

from solo_d2.modeling import mask_paste
from solo_d2.modeling.mask_paste import paste_masks, paste_masks_full, paste_masks_in_boxes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_case(seed):
    """Soft masks in [0, 1] (faint noise plus blobs, some touching the border), a padded size
    of 4x the mask size (what SOLO gets) or not, an image crop, an output size equal to the
    image or another (odd) one, and a threshold."""
    g = torch.Generator().manual_seed(seed)
    ri = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    h0, w0 = ri(2, 40), ri(2, 40)
    hp, wp = 4 * h0, 4 * w0
    if seed % 3 == 0:  # padded size not a multiple of the mask size
        hp, wp = hp + ri(0, 5), max(1, wp - ri(0, 3))
    h, w = ri(1, hp + 1), ri(1, wp + 1)
    out = (h, w) if seed % 2 == 0 else (ri(1, 3 * h), ri(1, 3 * w))
    r = ri(0, 7)
    soft = torch.rand(r, h0, w0, generator=g) * torch.rand(r, 1, 1, generator=g) * 0.6
    for k in range(r):
        y, x = ri(0, h0), ri(0, w0)
        if k % 3 == 0:  # at a border
            y = 0 if k % 2 else h0 - 1
        soft[k, max(0, y - ri(0, 4)) : y + ri(1, 4), max(0, x - ri(0, 4)) : x + ri(1, 4)] += 0.5
    thresh = [0.5, 0.3, 0.7, 0.0][seed % 4]
    return soft.clamp(0, 1), (hp, wp), (h, w), out, thresh


@pytest.mark.parametrize("block", range(4))
def test_box_paste_equals_full_paste_on_random_masks(block):
    for seed in range(block * 100, block * 100 + 100):
        soft, padded, image, out, thresh = _random_case(seed)
        full = paste_masks_full(soft, padded, image, out, thresh)
        boxed = paste_masks_in_boxes(soft, padded, image, out, thresh)
        assert boxed.shape == (soft.shape[0], *out) and boxed.dtype == torch.bool
        assert torch.equal(boxed, full), (seed, soft.shape, padded, image, out, thresh)


def test_box_paste_equals_full_paste_on_ties():
    # Values on a grid of eighths: many bilinear samples land exactly on the threshold.
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        h0, w0 = 5 + trial % 7, 6 + trial % 5
        soft = torch.randint(0, 9, (4, h0, w0), generator=g).float() / 8
        soft[:, :, : w0 // 2] = 0.5
        image = (4 * h0 - 3, 4 * w0 - 1)
        for out in (image, (2 * h0 + 1, 5 * w0 + 3)):
            for thresh in (0.5, 0.375, 0.25):
                full = paste_masks_full(soft, (4 * h0, 4 * w0), image, out, thresh)
                assert torch.equal(paste_masks_in_boxes(soft, (4 * h0, 4 * w0), image, out, thresh), full)


def test_box_paste_at_solo_sizes_touching_borders():
    # SOLO at 800x1333: 200x336 masks, padded 800x1344; output at the image size and at an
    # original image size of 480x800; masks covering corners, edges, the whole image, nothing.
    g = torch.Generator().manual_seed(1)
    soft = torch.rand(6, 200, 336, generator=g) * 0.3
    soft[0, :20, :30] = 0.9  # top-left corner
    soft[1, 180:, 300:] = 0.8  # bottom-right corner, partly in the padding (columns >= 1333/4)
    soft[2, 50:60, 333:] = 0.7  # right edge, only in the padding columns
    soft[3] = 0.95  # everything
    soft[4, 100:101, 100:101] = 0.9  # one cell
    # soft[5]: nothing above the threshold
    for out in ((800, 1333), (480, 800), (1001, 1667)):
        full = paste_masks_full(soft, (800, 1344), (800, 1333), out, 0.5)
        boxed = paste_masks_in_boxes(soft, (800, 1344), (800, 1333), out, 0.5)
        assert torch.equal(boxed, full), out
        assert not boxed[5].any() and boxed[3].all() and boxed[0, 0, 0] and boxed[4].any()


def test_empty_input_and_dispatch():
    soft = torch.zeros(0, 10, 12)
    for f in (paste_masks_full, paste_masks_in_boxes, paste_masks):
        out = f(soft, (40, 48), (37, 45), (20, 21), 0.5)
        assert out.shape == (0, 20, 21) and out.dtype == torch.bool


def test_near_ties_are_decided_by_the_kernel(monkeypatch):
    # With the tolerance at infinity every mask goes through the kernel: still equal.
    monkeypatch.setattr(mask_paste, "TIE_TOLERANCE", float("inf"))
    soft, padded, image, out, thresh = _random_case(7)
    assert torch.equal(
        paste_masks_in_boxes(soft, padded, image, out, thresh),
        paste_masks_full(soft, padded, image, out, thresh),
    )
