"""Reading image files the same way everywhere (training, evaluation, demo, validation).

:func:`read_image` is Detectron2's ``detection_utils.read_image`` (PIL, EXIF orientation applied,
``format`` "BGR" / "RGB" / a PIL mode) except for 16-bit images, which Detectron2 turns into white
images: PIL opens a 16-bit grayscale PNG in mode ``"I;16"`` and its conversion to RGB clips every
value above 255 to 255. Here such an image is scaled to 8 bits like ``SOLOPredictor`` does for a
uint16 array (``x / 257``, 65535 -> 255; rounded to uint8) before the conversion. 16-bit RGB(A)
PNGs already arrive in 8 bits from PIL (it keeps the high byte, i.e. ``x // 256``). A 32-bit
integer image (mode ``"I"``) with values outside 0..65535, or a floating-point image (mode
``"F"``), has no defined 8-bit scale and raises ``ValueError`` naming the file.
"""
import numpy as np
from detectron2.data.detection_utils import _apply_exif_orientation, convert_PIL_to_numpy
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = ["read_image", "to_8bit"]

#: PIL modes of 16-bit (and 32-bit integer) single-channel images.
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(image: Image.Image, name: str = "image") -> Image.Image:
    """A PIL image that Detectron2's ``convert_PIL_to_numpy`` maps to the right 8-bit pixels:
    16-bit grayscale scaled by 1/257 to mode "L"; other modes unchanged."""
    if image.mode == "F":
        raise ValueError(f"{name}: floating-point image (PIL mode 'F'): no defined 8-bit scale; "
                         "convert it to 8 or 16 bits")
    if image.mode not in _WIDE_INT_MODES:
        return image
    a = np.asarray(image)
    if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
        raise ValueError(f"{name}: 32-bit integer image with values in [{int(a.min())}, "
                         f"{int(a.max())}]: expected 8- or 16-bit pixel values")
    a8 = np.clip(np.rint(a.astype(np.float32) / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(a8, mode="L")


def read_image(file_name, format=None):
    """Detectron2's ``read_image`` (same arguments and output: H x W x C uint8 in ``format``, EXIF
    orientation applied) that scales 16-bit grayscale images to 8 bits instead of clipping them
    to white (module docs)."""
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        image = _apply_exif_orientation(image)
        return convert_PIL_to_numpy(to_8bit(image, str(file_name)), format)
