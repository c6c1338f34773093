"""The SOLO meta-architecture: backbone -> SOLO head -> (grid targets + losses | postprocessing)."""
from typing import Dict, List, Sequence

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList, Instances
from torch import nn

from .heads import build_solo_head
from .losses import category_loss, mask_loss
from .postprocessing import SOLOPostProcessor
from .targets import LevelTargets, SOLOTargetGenerator

__all__ = ["SOLO"]


@META_ARCH_REGISTRY.register()
class SOLO(nn.Module):
    """SOLO / Decoupled SOLO (the head decides) as a Detectron2 meta-architecture.

    Input: Detectron2's ``list[dict]``, one dict per image:

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
        in_features: Sequence[str],
        scale_ranges: Sequence[Sequence[float]],
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        sigma: float = 0.2,
        loss_cate_weight: float = 1.0,
        loss_mask_weight: float = 3.0,
        focal_loss_alpha: float = 0.25,
        focal_loss_gamma: float = 2.0,
        score_thresh: float = 0.1,
        mask_thresh: float = 0.5,
        nms_pre: int = 500,
        nms_kernel: str = "gaussian",
        nms_sigma: float = 2.0,
        update_thresh: float = 0.05,
        max_per_image: int = 100,
        nms_pre_before_masks: bool = False,
        channels_last: bool = False,
    ):
        """
        Args:
            backbone: a Detectron2 backbone whose outputs include ``in_features``.
            head: a SOLO head (:class:`SOLOHead` contract) with ``num_classes`` and ``num_grids``.
            in_features: backbone features fed to the head, finest first.
            scale_ranges: (lo, hi) per level, see ``MODEL.SOLO.SCALE_RANGES``.
            pixel_mean, pixel_std: per-channel normalisation of the input image.
            channels_last: run the backbone in channels-last memory format.
            Others: see :mod:`solo_d2.config`.
        """
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.in_features = list(in_features)
        self.num_classes = head.num_classes
        num_grids = head.num_grids
        _check_lengths(self.in_features, num_grids, scale_ranges)
        shapes = backbone.output_shape()
        missing = [f for f in self.in_features if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.SOLO.IN_FEATURES {missing} are not backbone outputs {sorted(shapes)}"
            )
        self.targets = SOLOTargetGenerator(self.num_classes, num_grids, scale_ranges, sigma)
        self.postprocess = SOLOPostProcessor(
            self.num_classes,
            num_grids,
            strides=_cate_strides([shapes[f].stride for f in self.in_features]),
            score_thresh=score_thresh,
            mask_thresh=mask_thresh,
            nms_pre=nms_pre,
            nms_kernel=nms_kernel,
            nms_sigma=nms_sigma,
            update_thresh=update_thresh,
            max_per_image=max_per_image,
            nms_pre_before_masks=nms_pre_before_masks,
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
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        sc = cfg.MODEL.SOLO
        _check_lengths(sc.IN_FEATURES, sc.NUM_GRIDS, sc.SCALE_RANGES)
        check_num_classes(cfg, cfg.DATASETS.TRAIN)
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in sc.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.SOLO.IN_FEATURES {missing} are not outputs of MODEL.BACKBONE.NAME = "
                f"{cfg.MODEL.BACKBONE.NAME!r} (it has {sorted(shapes)})"
            )
        head = build_solo_head(cfg, [shapes[f] for f in sc.IN_FEATURES])
        return {
            "backbone": backbone,
            "head": head,
            "in_features": sc.IN_FEATURES,
            "scale_ranges": sc.SCALE_RANGES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "sigma": sc.SIGMA,
            "loss_cate_weight": sc.LOSS_CATE_WEIGHT,
            "loss_mask_weight": sc.LOSS_MASK_WEIGHT,
            "focal_loss_alpha": sc.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": sc.FOCAL_LOSS_GAMMA,
            "score_thresh": sc.SCORE_THRESH_TEST,
            "mask_thresh": sc.MASK_THRESH_TEST,
            "nms_pre": sc.NMS_PRE,
            "nms_kernel": sc.NMS_KERNEL,
            "nms_sigma": sc.NMS_SIGMA,
            "update_thresh": sc.UPDATE_THRESH_TEST,
            "max_per_image": sc.MAX_PER_IMAGE,
            "nms_pre_before_masks": sc.NMS_PRE_BEFORE_MASKS,
            "channels_last": sc.CHANNELS_LAST,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        images = self.preprocess_image(batched_inputs)
        features = self.run_backbone(images.tensor)
        cate_logits, mask_feats = self.head([features[f] for f in self.in_features])
        if self.training:
            gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
            targets = self.targets(
                gt_instances,
                tuple(images.tensor.shape[-2:]),
                [self.head.mask_size(m) for m in mask_feats],
            )
            return self.losses(cate_logits, mask_feats, targets)
        return self.inference_from_outputs(cate_logits, mask_feats, images, batched_inputs)

    def run_backbone(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Backbone + FPN on the (N, 3, H, W) batch; returns standard-layout feature maps."""
        if not self.channels_last:
            return self.backbone(x)
        features = self.backbone(x.contiguous(memory_format=torch.channels_last))
        return {k: v.contiguous() for k, v in features.items()}

    def preprocess_image(self, batched_inputs: List[Dict[str, torch.Tensor]]) -> ImageList:
        """Check, normalise, pad (to the backbone's size divisibility) and batch the images.

        Every input is checked and a bad one raises ``TypeError`` / ``ValueError`` naming
        ``batched_inputs[i]``: ``image`` must be a (3, H, W) uint8 or floating tensor with
        H, W >= 1 (``SOLOPredictor`` converts grayscale / RGBA / 16-bit arrays); a floating image
        must be finite (no NaN/inf) and is taken as 0..255 pixel values; ``height`` / ``width``,
        when given, must be positive; in training, ``instances`` is required.
        """
        if not isinstance(batched_inputs, (list, tuple)) or len(batched_inputs) == 0:
            got = type(batched_inputs).__name__
            raise TypeError(
                "SOLO expects a non-empty list of dicts (one per image), got "
                + (f"an empty {got}" if isinstance(batched_inputs, (list, tuple)) else got)
            )
        images = []
        for i, x in enumerate(batched_inputs):
            where = f"batched_inputs[{i}]"
            if not isinstance(x, dict) or "image" not in x:
                keys = f" with keys {sorted(x)}" if isinstance(x, dict) else ""
                raise TypeError(
                    f"{where} must be a dict with an 'image' tensor, got {type(x).__name__}{keys}"
                )
            img = x["image"]
            if not isinstance(img, torch.Tensor):
                raise TypeError(
                    f"{where}['image'] must be a torch.Tensor (3, H, W), got {type(img).__name__}"
                )
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(
                    f"{where}['image'] must be a (3, H, W) tensor, got shape {tuple(img.shape)}"
                )
            if img.shape[1] == 0 or img.shape[2] == 0:
                raise ValueError(f"{where}['image'] is empty: shape {tuple(img.shape)}")
            if img.dtype != torch.uint8 and not img.is_floating_point():
                raise TypeError(
                    f"{where}['image'] has dtype {img.dtype}: expected uint8 or a floating dtype "
                    "with 0..255 pixel values"
                )
            for key in ("height", "width"):
                if key in x and not int(x[key]) > 0:
                    raise ValueError(
                        f"{where}['{key}'] (requested output size) must be positive, got {x[key]}"
                    )
            if self.training and "instances" not in x:
                raise ValueError(f"{where} has no 'instances': training needs the ground truth")
            img = img.to(self.device, torch.float32)
            if x["image"].is_floating_point() and not bool(torch.isfinite(img).all()):
                bad = int((~torch.isfinite(img)).sum())
                raise ValueError(
                    f"{where}['image'] has {bad} non-finite (NaN or inf) pixel values"
                )
            images.append((img - self.pixel_mean) / self.pixel_std)
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
            sum(f.sum() for f in mask_feats) + sum(p.sum() for p in self.head.mask_output_parameters())
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
        results = []
        padded = tuple(images.tensor.shape[-2:])
        mask_size = self.head.mask_size(mask_feats[0])
        for b, (x, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
            output_size = (int(x.get("height", image_size[0])), int(x.get("width", image_size[1])))

            def mask_fn(level, cells, b=b):  # this image's features only, at the finest size
                img = torch.zeros_like(cells)
                feat = mask_feats[level][b : b + 1]
                return self.head.mask_probs(feat, level, img, cells, out_size=mask_size)

            instances = self.postprocess(
                [c[b] for c in cate_logits], mask_fn, mask_size, padded, image_size, output_size
            )
            results.append({"instances": instances})
        return results


def _check_lengths(in_features, num_grids, scale_ranges):
    n = len(in_features)
    for key, value in (("NUM_GRIDS", num_grids), ("SCALE_RANGES", scale_ranges)):
        if len(value) != n:
            raise ValueError(
                f"MODEL.SOLO.{key} has {len(value)} entries but MODEL.SOLO.IN_FEATURES has {n} "
                f"({list(in_features)}): give one per level"
            )
    for r in scale_ranges:
        if len(r) != 2 or r[0] > r[1]:
            raise ValueError(f"MODEL.SOLO.SCALE_RANGES entries must be [lo, hi] with lo <= hi, got {r}")
    if any(int(s) <= 0 for s in num_grids):
        raise ValueError(f"MODEL.SOLO.NUM_GRIDS must be positive, got {list(num_grids)}")


def check_num_classes(cfg, dataset_names):
    """Raise if ``MODEL.SOLO.NUM_CLASSES`` differs from the number of ``thing_classes`` of one
    of ``dataset_names`` (datasets whose classes are not known yet are skipped)."""
    n = cfg.MODEL.SOLO.NUM_CLASSES
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) != n:
            raise ValueError(
                f"MODEL.SOLO.NUM_CLASSES = {n} but dataset {name!r} has {len(classes)} classes "
                f"({list(classes)[:5]}{'...' if len(classes) > 5 else ''}); set "
                f"MODEL.SOLO.NUM_CLASSES {len(classes)}"
            )


def _cate_strides(feature_strides: List[int]) -> List[int]:
    """Strides after the head's resizing: the first level takes the second's stride and the
    last the one before it ([4, 8, 16, 32, 64] -> [8, 8, 16, 32, 32])."""
    s = list(feature_strides)
    if len(s) > 1:
        s[0], s[-1] = s[1], s[-2]
    return s
