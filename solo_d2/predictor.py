"""``SOLOPredictor``: Detectron2's ``DefaultPredictor`` with safe weight loading and input checks.

    from solo_d2.predictor import SOLOPredictor
    predictor = SOLOPredictor(cfg)              # cfg.MODEL.WEIGHTS: a .pth (or model-zoo .pkl)
    instances = predictor(image)["instances"]  # image: H x W x C numpy array, BGR (cfg.INPUT.FORMAT)

Differences from ``DefaultPredictor``:

- ``MODEL.DEVICE`` goes through :func:`solo_d2.config.resolve_device`: a cfg that says cuda runs on
  the CPU (with a warning) where CUDA is absent;
- the weights are loaded with :class:`solo_d2.checkpoint.SafeDetectionCheckpointer`
  (``torch.load(weights_only=True)``; a checkpoint that needs arbitrary unpickling is refused
  unless ``allow_unsafe_load=True`` or ``SOLO_D2_UNSAFE_LOAD=1``; weights that do not fit the head,
  and an empty ``MODEL.WEIGHTS``, are refused unless ``allow_partial_weights=True`` or
  ``SOLO_D2_ALLOW_PARTIAL_WEIGHTS=1``);
- the input image is checked and normalised by :func:`as_hwc3` before resizing:

  ===================================  ==================================================
  input                                behaviour
  ===================================  ==================================================
  H x W (grayscale), H x W x 1         replicated to 3 channels
  H x W x 3                            used as is (channel order ``cfg.INPUT.FORMAT``)
  H x W x 4 (BGRA / RGBA)              alpha dropped
  uint8                                used as is
  uint16                               scaled to 0..255 (``x / 257``); a warning when every
                                       value is <= 255 (8-bit data in a uint16 array)
  other integer dtypes                 accepted when every value is in 0..255, else ValueError
  float16/32/64                        taken as 0..255 pixel values; NaN/inf -> ValueError; a
                                       warning when every value is in 0..1 (a 0..1 image)
  bool, complex, object, other shapes  TypeError / ValueError
  H == 0 or W == 0                     ValueError
  ===================================  ==================================================

- the resized image has at least 1 pixel per side (an extremely elongated image such as 1 x 100000
  is resized to 1 x MAX_SIZE_TEST, not to 0 x MAX_SIZE_TEST);
- the output masks always have the size of the *original* image.
"""
import warnings

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from .checkpoint import SafeDetectionCheckpointer
from .config import resolve_device

__all__ = ["SOLOPredictor", "as_hwc3", "model_input"]


def as_hwc3(image, name: str = "image") -> np.ndarray:
    """Check ``image`` and return it as an (H, W, 3) uint8 or float32 array (table above).

    Raises:
        TypeError: not a numpy array, or an unsupported dtype.
        ValueError: unsupported shape, empty image, NaN/inf values, out-of-range integers.
    """
    if isinstance(image, torch.Tensor):
        raise TypeError(
            f"{name} must be a numpy array (H, W, C) as read by cv2.imread, got a torch.Tensor "
            f"{tuple(image.shape)}; call the model directly with {{'image': (3, H, W) tensor}} instead"
        )
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy array (H, W, C), got {type(image).__name__}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"{name} must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {image.shape}")
    if image.dtype == np.bool_ or not (
        np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
    ):
        raise TypeError(f"{name} has dtype {image.dtype}: expected uint8, uint16 or float (0..255)")
    if image.shape[2] == 4:
        image = image[:, :, :3]  # drop alpha
    if image.dtype == np.uint16:
        if 0 < int(image.max()) <= 255:
            warnings.warn(
                f"{name} is a uint16 array whose values are all in 0..{int(image.max())}: it is taken "
                "as 16-bit (scaled by 1/257, so nearly black); if it holds 8-bit values, pass "
                "image.astype(np.uint8)", stacklevel=3)
        image = image.astype(np.float32) / 257.0  # 65535 -> 255
    elif np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32, copy=False)
        if not np.isfinite(image).all():
            raise ValueError(f"{name} has {int((~np.isfinite(image)).sum())} NaN or inf pixel values")
        if float(image.max()) <= 1.0 and float(image.min()) >= 0.0 and float(image.max()) > 0.0:
            warnings.warn(
                f"{name} is a float array whose values are all in 0..1: pixel values are taken as "
                "0..255 (so it is nearly black); if it is a 0..1 image, pass image * 255",
                stacklevel=3)
    elif image.dtype != np.uint8:  # other integers
        lo, hi = int(image.min()), int(image.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"{name} has dtype {image.dtype} with values in [{lo}, {hi}]: expected 0..255"
            )
        image = image.astype(np.uint8)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)


class SOLOPredictor(DefaultPredictor):
    """``DefaultPredictor`` for SOLO with safe loading and input checks (module docs)."""

    def __init__(self, cfg, allow_unsafe_load=None, allow_partial_weights=None):
        """
        Args:
            cfg: a Detectron2 cfg with the SOLO keys; ``MODEL.WEIGHTS`` is loaded.
            allow_unsafe_load: allow checkpoints that need arbitrary unpickling; ``None`` reads
                ``$SOLO_D2_UNSAFE_LOAD``.
            allow_partial_weights: allow weights whose head parameters do not fit the model, and
                an empty ``MODEL.WEIGHTS`` (random weights); ``None`` reads
                ``$SOLO_D2_ALLOW_PARTIAL_WEIGHTS``. Otherwise these raise
                :class:`solo_d2.checkpoint.IncompatibleCheckpointError` naming the keys.
        """
        self.cfg = cfg.clone()
        device = resolve_device(self.cfg.MODEL.DEVICE)
        if device != self.cfg.MODEL.DEVICE:
            frozen = self.cfg.is_frozen()
            self.cfg.defrost()
            self.cfg.MODEL.DEVICE = device
            if frozen:
                self.cfg.freeze()
        self.model = build_model(self.cfg)
        self.model.eval()
        if len(self.cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(self.cfg.DATASETS.TEST[0])
        checkpointer = SafeDetectionCheckpointer(
            self.model,
            allow_unsafe_load=allow_unsafe_load,
            strict_heads=None if allow_partial_weights is None else not allow_partial_weights,
        )
        checkpointer.load(self.cfg.MODEL.WEIGHTS)
        self.aug = T.ResizeShortestEdge(
            [self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MIN_SIZE_TEST], self.cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = self.cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got {self.input_format!r}")

    def __call__(self, original_image):
        """
        Args:
            original_image (np.ndarray): (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), BGR(A) order
                (as read by ``cv2.imread``), uint8 / uint16 / float (0..255).

        Returns:
            dict: ``{"instances": Instances}`` of size (H, W) (the original image's).
        """
        return self.predict_batch([original_image])[0]

    def predict_batch(self, original_images):
        """:meth:`__call__` of several images in one model call: a list of ``{"instances":
        Instances}``, one per image, each of its image's size (the results equal those of one
        image at a time: SOLO's inference is batch-independent)."""
        inputs = []
        for original_image in original_images:
            image = as_hwc3(original_image)
            if self.input_format == "RGB":
                image = np.ascontiguousarray(image[:, :, ::-1])  # model wants RGB, input is BGR
            inputs.append(model_input(image, self.aug, self.cfg.MODEL.DEVICE))
        with torch.no_grad():
            return self.model(inputs)


def model_input(image: np.ndarray, aug: T.ResizeShortestEdge, device) -> dict:
    """The model's input dict of an (H, W, C) image already in the model's channel order:
    ``{"image": (C, h, w) float32 tensor on device, "height": H, "width": W}``, the image resized
    by ``aug`` (the test size; at least 1 pixel per side, no resize when the size is unchanged)."""
    height, width = image.shape[:2]
    new_h, new_w = aug.get_output_shape(height, width, aug.short_edge_length[0], aug.max_size)
    new_h, new_w = max(int(new_h), 1), max(int(new_w), 1)
    if (new_h, new_w) != (height, width):
        image = T.ResizeTransform(height, width, new_h, new_w).apply_image(image)
    tensor = torch.as_tensor(np.ascontiguousarray(image).astype("float32").transpose(2, 0, 1))
    return {"image": tensor.to(device), "height": height, "width": width}
