"""The SOLO meta-architecture: backbone -> SOLO head -> (grid targets + losses | postprocessing).

``SOLO`` composes injected parts, built by :meth:`SOLO.from_config`: a backbone, a head
(:mod:`.heads`), a :class:`SOLOTargetGenerator` and a :class:`SOLOPostProcessor`; each part
validates its own arguments, ``SOLO`` only that they agree on the levels.

Not built on Detectron2's ``DenseDetector``: of what it offers, SOLO would keep only the pixel
buffers and the ``device`` property (a few lines). Its ``preprocess_image`` has no input checks
(:func:`check_batched_inputs`); its ``forward`` runs the backbone without SOLO's channels-last
option and ends inference with ``detector_postprocess``, which takes ``pred_masks`` as
box-relative (N, 1, M, M) ROI masks, not SOLO's full-image masks (SOLO pastes its masks directly
at the requested output size). ``forward`` and ``preprocess_image`` would be overridden, so the
base class would add an unused contract (``forward_training`` / ``forward_inference``) and save
almost nothing.
"""
from contextlib import nullcontext
from typing import Dict, List, Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList, Instances
from torch import nn

from ..config import autocast_dtype
from ..data.checks import check_num_classes
from .heads import build_solo_head
from .input_checks import check_batched_inputs
from .losses import category_loss, mask_loss
from .postprocessing import SOLOPostProcessor
from .targets import LevelTargets, SOLOTargetGenerator

__all__ = ["SOLO", "channels_last_pays"]

#: The precisions backbone and head run in at inference, and the autocast dtype of each (None: no
#: autocast). MODEL.SOLO.INFERENCE_DTYPE also takes "auto" (:func:`inference_dtype_of`).
INFERENCE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_inference_dtype(inference_dtype: str, device) -> None:
    """``MODEL.SOLO.INFERENCE_DTYPE`` is known, and float16 runs on CUDA only: CPU float16
    autocast is slow and its convolutions are not float16 kernels there; bfloat16 is the CPU's
    reduced precision. Raises ValueError naming the key."""
    if inference_dtype not in INFERENCE_DTYPES:
        raise ValueError(
            f"MODEL.SOLO.INFERENCE_DTYPE must be one of {sorted(INFERENCE_DTYPES)}, got "
            f"{inference_dtype!r}"
        )
    if inference_dtype == "float16" and torch.device(device).type != "cuda":
        raise ValueError(
            f"MODEL.SOLO.INFERENCE_DTYPE float16 needs a CUDA device (the model is on "
            f"{torch.device(device).type!r}, MODEL.DEVICE): use bfloat16 on the CPU, or float32"
        )


def channels_last_pays(channels_last: bool, device, norm: str) -> bool:
    """Whether ``MODEL.SOLO.CHANNELS_LAST`` is applied (the one place that decides): the key,
    except on CUDA with GroupNorm in the head (``MODEL.SOLO.NORM`` "GN"), where CUDA's
    GroupNorm takes standard-layout inputs, so each of the head's GN layers would copy its input
    and output (unmeasured on a GPU; on the CPU channels-last is faster, BENCHMARKS.md)."""
    if not channels_last:
        return False
    return not (torch.device(device).type == "cuda" and norm == "GN")


def inference_dtype_of(cfg) -> str:
    """The precision of ``MODEL.SOLO.INFERENCE_DTYPE`` on ``MODEL.DEVICE``, as a key of
    :data:`INFERENCE_DTYPES`: "auto" is the device's fast reduced precision where it executes
    it natively, else float32; a named dtype is used as asked
    (:func:`solo_d2.config.autocast_dtype` decides, and logs why it falls back or warns)."""
    name = cfg.MODEL.SOLO.INFERENCE_DTYPE
    device = cfg.MODEL.DEVICE
    if name == "auto":
        name = "float16" if torch.device(device).type == "cuda" else "bfloat16"
    elif name not in INFERENCE_DTYPES:
        raise ValueError(
            f"MODEL.SOLO.INFERENCE_DTYPE must be one of {['auto'] + sorted(INFERENCE_DTYPES)}, "
            f"got {name!r}"
        )
    check_inference_dtype(name, device)
    dtype = autocast_dtype(name, device, key="MODEL.SOLO.INFERENCE_DTYPE",
                           explicit=cfg.MODEL.SOLO.INFERENCE_DTYPE != "auto")
    return "float32" if dtype is None else name


@META_ARCH_REGISTRY.register()
class SOLO(nn.Module):
    """SOLO / Decoupled SOLO (the head decides) as a Detectron2 meta-architecture.

    Input: Detectron2's ``list[dict]``, one dict per image (checked by
    :func:`solo_d2.modeling.input_checks.check_batched_inputs`):

    - ``"image"``: (3, H, W) uint8 or float tensor in ``MODEL.INPUT.FORMAT`` channel order;
    - ``"instances"`` (training): ``Instances`` with ``gt_classes`` (int64, 0..C-1) and
      ``gt_masks`` (``BitMasks`` or ``PolygonMasks``); ``gt_boxes`` used when present;
    - ``"height"``, ``"width"`` (inference, optional): requested output size; default: the
      image's own size.

    Output:

    - training: ``{"loss_cate": scalar, "loss_mask": scalar}`` (already weighted);
    - inference: one ``{"instances": Instances}`` per image, of size (height, width), with
      ``pred_masks`` (R, height, width) bool, ``scores`` (R,) float32, ``pred_classes`` (R,) int64
      and ``pred_boxes`` (``Boxes``, (R, 4) float32, derived from the masks). R may be 0.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: nn.Module,
        targets: SOLOTargetGenerator,
        postprocessor: SOLOPostProcessor,
        in_features: Sequence[str],
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        channels_last: bool = False,
        inference_dtype: str = "float32",
        loss_cate_weight: float = 1.0,
        loss_mask_weight: float = 3.0,
        focal_loss_alpha: float = 0.25,
        focal_loss_gamma: float = 2.0,
    ):
        """
        Args:
            backbone: a Detectron2 backbone whose outputs include ``in_features``
                (:meth:`from_config` checks them).
            head: a SOLO head (:class:`SOLOHead` contract) with ``num_classes`` and ``num_grids``.
            targets: the training targets of the head's levels.
            postprocessor: turns one image's head outputs into ``Instances``.
            in_features: backbone features fed to the head, finest first.
            pixel_mean, pixel_std: per-channel normalisation of the input image.
            channels_last: run the backbone and the head's convolutions in channels-last memory
                format (the head's outputs are standard-layout tensors either way).
            inference_dtype: a key of :data:`INFERENCE_DTYPES` (:meth:`from_config` resolves
                the config's "auto"; "float16" on CUDA only): backbone and head at inference
                under autocast in that dtype (:meth:`inference_autocast`); post-processing in
                float32 with autocast off.
            Others: see :mod:`solo_d2.config`.
        """
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.targets = targets
        self.postprocess = postprocessor
        self.in_features = list(in_features)
        self.num_classes = head.num_classes
        if len(self.in_features) != len(head.num_grids):
            raise ValueError(
                f"MODEL.SOLO.NUM_GRIDS has {len(head.num_grids)} entries but "
                f"MODEL.SOLO.IN_FEATURES has {len(self.in_features)} ({self.in_features}): give "
                "one per level"
            )
        for name, part in (("targets", targets), ("postprocessor", postprocessor)):
            if list(part.num_grids) != list(head.num_grids) or part.num_classes != self.num_classes:
                raise ValueError(
                    f"SOLO: {name} has grids {list(part.num_grids)} and {part.num_classes} classes, "
                    f"the head {list(head.num_grids)} and {self.num_classes}"
                )
        self.loss_cate_weight = loss_cate_weight
        self.loss_mask_weight = loss_mask_weight
        if not (focal_loss_gamma == 0 or focal_loss_gamma >= 1):
            # d/dx x^gamma is infinite at x = 0 for 0 < gamma < 1: a cell whose class the model
            # predicts with probability 1.0 (in float32) gets a NaN gradient, which then reaches
            # every weight through the optimizer step.
            raise ValueError(
                f"MODEL.SOLO.FOCAL_LOSS_GAMMA = {focal_loss_gamma}: must be 0 or >= 1 (for "
                "0 < gamma < 1 the focal loss's gradient is NaN where a prediction is certain)"
            )
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma
        self.channels_last = channels_last
        if inference_dtype not in INFERENCE_DTYPES:
            raise ValueError(
                f"MODEL.SOLO.INFERENCE_DTYPE must be one of {sorted(INFERENCE_DTYPES)}, got "
                f"{inference_dtype!r}"
            )
        self.inference_dtype = inference_dtype
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
            self.head.to(memory_format=torch.channels_last)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        sc = cfg.MODEL.SOLO
        inference_dtype = inference_dtype_of(cfg)
        check_num_classes(cfg, cfg.DATASETS.TRAIN)
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in sc.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.SOLO.IN_FEATURES {missing} are not outputs of MODEL.BACKBONE.NAME = "
                f"{cfg.MODEL.BACKBONE.NAME!r} (it has {sorted(shapes)})"
            )
        return {
            "backbone": backbone,
            "head": build_solo_head(cfg, [shapes[f] for f in sc.IN_FEATURES]),
            "targets": SOLOTargetGenerator(cfg),
            "postprocessor": SOLOPostProcessor(
                cfg, feature_strides=[shapes[f].stride for f in sc.IN_FEATURES]
            ),
            "in_features": sc.IN_FEATURES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "loss_cate_weight": sc.LOSS_CATE_WEIGHT,
            "loss_mask_weight": sc.LOSS_MASK_WEIGHT,
            "focal_loss_alpha": sc.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": sc.FOCAL_LOSS_GAMMA,
            "channels_last": channels_last_pays(sc.CHANNELS_LAST, cfg.MODEL.DEVICE, sc.NORM),
            "inference_dtype": inference_dtype,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        features = self.run_backbone(images.tensor)
        cate_logits, mask_feats = self.head([features[f] for f in self.in_features])
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        targets = self.targets(
            gt_instances,
            tuple(images.tensor.shape[-2:]),
            [self.head.mask_size(m) for m in mask_feats],
        )
        return self.losses(cate_logits, mask_feats, targets)

    def inference(self, batched_inputs: List[Dict[str, torch.Tensor]]) -> List[Dict[str, Instances]]:
        """Predictions for each input, independent of what else is in the batch.

        SOLO's grids cover the padded canvas of the batch, so an image padded to a larger
        neighbour's size would be seen on another grid (other scores and masks). The images are
        therefore grouped by the canvas each would get alone (its size rounded up to the
        backbone's size divisibility): each group, still batched, runs through backbone, head and
        postprocessing on that canvas.

        Returns:
            one ``{"instances": Instances}`` per input, in input order (see class docs).
        """
        images = self.preprocess_image(batched_inputs)  # checks every input, names the bad one
        d = max(int(self.backbone.size_divisibility), 1)
        groups: Dict[tuple, List[int]] = {}
        for i, (h, w) in enumerate(images.image_sizes):
            groups.setdefault((-(-int(h) // d) * d, -(-int(w) // d) * d), []).append(i)
        results: List[Dict[str, Instances]] = [None] * len(batched_inputs)  # type: ignore
        for idx in groups.values():
            if len(groups) == 1:
                group_images = images
            else:
                group_images = ImageList.from_tensors(
                    [images.tensor[i, :, : images.image_sizes[i][0], : images.image_sizes[i][1]]
                     for i in idx],
                    self.backbone.size_divisibility,
                    padding_constraints=self.backbone.padding_constraints,
                )
            with self.inference_autocast():
                features = self.run_backbone(group_images.tensor)
                cate_logits, mask_feats = self.head([features[f] for f in self.in_features])
            group_results = self.inference_from_outputs(
                cate_logits, mask_feats, group_images, [batched_inputs[i] for i in idx]
            )
            for i, r in zip(idx, group_results):
                results[i] = r
        return results

    def inference_autocast(self):
        """The context backbone and head run in at inference: autocast in ``inference_dtype``
        on the model's device, none for "float32". float16 on a non-CUDA device (a model moved
        after it was built) raises ValueError (:func:`check_inference_dtype`)."""
        if self.inference_dtype == "float32":
            return nullcontext()
        check_inference_dtype(self.inference_dtype, self.device)
        return torch.autocast(self.device.type, dtype=INFERENCE_DTYPES[self.inference_dtype])

    @staticmethod
    def float_outputs(cate_logits: List[torch.Tensor], mask_feats: list):
        """The head outputs in float32 (post-processing's precision); a ``mask_feats`` entry
        may be a tensor or a tuple of tensors. Tensors already in float32 are returned as they
        are."""

        def to_float(x):
            return x.float() if isinstance(x, torch.Tensor) else type(x)(to_float(t) for t in x)

        return [c.float() for c in cate_logits], [to_float(m) for m in mask_feats]

    def run_backbone(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Backbone + FPN on the (N, 3, H, W) batch; returns the feature maps in the model's
        memory layout (channels-last with ``channels_last``: the head's convolutions run in it
        too; the head returns standard-layout tensors)."""
        if not self.channels_last:
            return self.backbone(x)
        return self.backbone(x.contiguous(memory_format=torch.channels_last))

    def preprocess_image(self, batched_inputs: List[Dict[str, torch.Tensor]]) -> ImageList:
        """Check (:func:`check_batched_inputs`), normalise, pad (to the backbone's size
        divisibility) and batch the images."""
        check_batched_inputs(batched_inputs, self.training)
        images = [
            (x["image"].to(self.device, torch.float32) - self.pixel_mean) / self.pixel_std
            for x in batched_inputs
        ]
        return ImageList.from_tensors(
            images,
            self.backbone.size_divisibility,
            padding_constraints=self.backbone.padding_constraints,
        )

    def losses(
        self,
        cate_logits: List[torch.Tensor],
        mask_feats: List[torch.Tensor],
        targets: List[LevelTargets],
    ) -> Dict[str, torch.Tensor]:
        """Weighted focal + dice losses from the head outputs and the grid targets."""
        loss_cate = category_loss(
            cate_logits,
            [t.labels for t in targets],
            self.num_classes,
            self.focal_loss_alpha,
            self.focal_loss_gamma,
        )
        pos_probs = [
            self.head.mask_probs(feat, level, t.pos_img, t.pos_cell)
            for level, (feat, t) in enumerate(zip(mask_feats, targets))
        ]
        loss_mask = mask_loss(pos_probs, [t.pos_masks() for t in targets])
        # Keep every mask parameter in the graph even where a level (or the whole batch) has no
        # positive cell: DDP runs without find_unused_parameters. The added term is exactly 0.
        loss_mask = loss_mask + 0.0 * (
            sum(t.sum() for f in mask_feats for t in self.head.mask_feat_tensors(f))
            + sum(p.sum() for p in self.head.mask_output_parameters())
        )
        return {
            "loss_cate": self.loss_cate_weight * loss_cate,
            "loss_mask": self.loss_mask_weight * loss_mask,
        }

    def inference_from_outputs(
        self,
        cate_logits: List[torch.Tensor],
        mask_feats: List[torch.Tensor],
        images: ImageList,
        batched_inputs: List[Dict[str, torch.Tensor]],
    ) -> List[Dict[str, Instances]]:
        """Post-processing of the head outputs, per image, in float32, outside any autocast
        the caller runs (float16 cannot hold mask areas and intersections above 65,504
        pixels; the post-processor's gathers expect float32 masks). The post-processor turns
        autocast off itself too, for its other callers."""
        with torch.autocast(self.device.type, enabled=False):
            cate_logits, mask_feats = self.float_outputs(cate_logits, mask_feats)
            return self._postprocess_images(cate_logits, mask_feats, images, batched_inputs)

    def _postprocess_images(self, cate_logits, mask_feats, images, batched_inputs):
        results = []
        padded = tuple(images.tensor.shape[-2:])
        mask_size = self.head.mask_size(mask_feats[0])
        for b, (x, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
            output_size = (int(x.get("height", image_size[0])), int(x.get("width", image_size[1])))

            def mask_fn(level, cells, b=b):  # this image's features only, at the finest size
                img = torch.zeros_like(cells)
                feat = self.head.image_mask_feat(mask_feats[level], b)
                return self.head.mask_probs(feat, level, img, cells, out_size=mask_size)

            instances = self.postprocess(
                [c[b] for c in cate_logits], mask_fn, mask_size, padded, image_size, output_size
            )
            results.append({"instances": instances})
        return results
