"""Config keys of solo_d2: one function, :func:`add_solo_config`, adds them to a Detectron2 cfg.

Defaults follow the reference SOLO R-50-FPN on COCO (``../shared/SOLO_SPEC.md``). Nothing here edits
Detectron2's global defaults: call ``add_solo_config(cfg)`` on a cfg from ``get_cfg()``.
"""
from detectron2.config import CfgNode as CN


def add_solo_config(cfg):
    """Add the ``MODEL.SOLO`` section (and solo_d2's few other keys) to ``cfg`` in place.

    Safe to call twice: an existing ``MODEL.SOLO`` section is left as it is.
    """
    if "SOLO" in cfg.MODEL:
        return cfg
    _C = cfg
    _C.MODEL.SOLO = CN()
    # Number of object categories, without background (labels are 0..NUM_CLASSES-1).
    _C.MODEL.SOLO.NUM_CLASSES = 80
    # Backbone features the head sees, finest first. P2 is resized x0.5 and the last one is
    # resized to the size of the one before it, so the effective strides are [8, 8, 16, 32, 32].
    _C.MODEL.SOLO.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    # Grid number S per level (one per IN_FEATURES entry).
    _C.MODEL.SOLO.NUM_GRIDS = [40, 36, 24, 16, 12]
    # Object scale range per level, on sqrt(w*h) of the GT box in input pixels, inclusive and
    # overlapping (one object may be positive on two levels). One (lo, hi) pair per level.
    _C.MODEL.SOLO.SCALE_RANGES = [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]]
    # Centre-region factor: a GT is positive in the cells covered by centre +- 0.5 * SIGMA * (w, h),
    # clipped to one cell around the centre cell (1 to 9 positive cells per level).
    _C.MODEL.SOLO.SIGMA = 0.2

    # Head (solo_d2.modeling.heads): "SOLOHead" (vanilla, S^2 mask channels per level),
    # "DecoupledSOLOHead" (published Decoupled SOLO: separate X / Y towers, S + S channels),
    # "DecoupledSOLOLightHead" (published light: one shared tower) or "DecoupledSOLOCompactHead"
    # (solo_d2's own variant: one shared tower, 1x1 X / Y convs).
    _C.MODEL.SOLO.HEAD_TYPE = "SOLOHead"
    # Channels of every conv in both towers.
    _C.MODEL.SOLO.CONV_CHANNELS = 256
    # Number of stacked 3x3 convs in each of the category and mask towers.
    _C.MODEL.SOLO.NUM_STACKED_CONVS = 7
    # Normalisation in the towers: "GN" (32 groups), "" for none, or any detectron2 get_norm name.
    _C.MODEL.SOLO.NORM = "GN"
    # How many convs of each tower, counted from the last, are deformable 3x3 convs (DCN v1 on
    # torchvision.ops.deform_conv2d) instead of plain ones. The reference light DCN model uses 1.
    _C.MODEL.SOLO.NUM_DEFORMABLE_CONVS = 0
    # Prior probability used to initialise the biases of the final category and mask convs.
    _C.MODEL.SOLO.PRIOR_PROB = 0.01
    # Prior probability for the biases of the final mask conv(s) alone; 0 means PRIOR_PROB (the
    # reference). Decoupled SOLO multiplies two of them, so with the reference 0.01 on X and on Y
    # a cell's mask starts at 1e-4 and its gradients are ~100x smaller than vanilla SOLO's:
    # 0.1 (= sqrt(0.01)) starts its masks where vanilla SOLO's start.
    _C.MODEL.SOLO.MASK_PRIOR_PROB = 0.0
    # Initialisation of the towers' 3x3 convs: "normal" (N(0, 0.01), the reference, which starts
    # from an ImageNet backbone) or "msra" (He init, Detectron2's c2_msra_fill). A conv followed
    # by GroupNorm is scale-invariant, so its relative step is ~lr / |w|^2: N(0, 0.01) weights
    # take steps ~35 times larger than He init's at 64 channels (~9 times at 256). From scratch
    # on the shapes demo, "msra" gave mask AP 26.9 against 23.8 after 2000 iterations
    # (BENCHMARKS.md). The output convs keep N(0, 0.01) and the prior biases either way.
    _C.MODEL.SOLO.TOWER_INIT = "normal"

    # Losses: L = LOSS_CATE_WEIGHT * focal + LOSS_MASK_WEIGHT * dice.
    _C.MODEL.SOLO.LOSS_CATE_WEIGHT = 1.0
    _C.MODEL.SOLO.LOSS_MASK_WEIGHT = 3.0
    # Sigmoid focal loss alpha and gamma (category branch). Gamma must be 0 or >= 1: for
    # 0 < gamma < 1 the loss has a NaN gradient where a prediction is certain (checked at build).
    # The shapes configs use 1: with the reference 2, the wrong classes of an undecided cell
    # (scores ~0.25 each) get gradients ~4 times smaller, and from scratch the category branch
    # took much longer to tell the shapes apart (mask AP 38.4 against 27.8 after 2000
    # iterations, BENCHMARKS.md).
    _C.MODEL.SOLO.FOCAL_LOSS_ALPHA = 0.25
    _C.MODEL.SOLO.FOCAL_LOSS_GAMMA = 2.0

    # Inference.
    # Category score threshold for candidate cells (after point NMS).
    _C.MODEL.SOLO.SCORE_THRESH_TEST = 0.1
    # Threshold that binarises soft masks (for area, maskness, Matrix NMS and the output masks).
    _C.MODEL.SOLO.MASK_THRESH_TEST = 0.5
    # Keep at most this many candidates before Matrix NMS: the highest after the area filter and
    # maskness rescoring (the reference's nms_pre).
    _C.MODEL.SOLO.NMS_PRE = 500
    # Apply the NMS_PRE top-k to the category scores before forming any mask instead (solo_d2's
    # cheaper order: at most NMS_PRE masks are formed; results differ from the reference's only
    # when more than NMS_PRE cells pass SCORE_THRESH_TEST, BENCHMARKS.md).
    _C.MODEL.SOLO.NMS_PRE_BEFORE_MASKS = False
    # Matrix NMS kernel: "gaussian" or "linear".
    _C.MODEL.SOLO.NMS_KERNEL = "gaussian"
    # Sigma of the gaussian Matrix NMS kernel.
    _C.MODEL.SOLO.NMS_SIGMA = 2.0
    # Drop detections whose score after Matrix NMS decay is below this.
    _C.MODEL.SOLO.UPDATE_THRESH_TEST = 0.05
    # Maximum number of detections per image.
    _C.MODEL.SOLO.MAX_PER_IMAGE = 100

    # Run the backbone (ResNet + FPN) in channels-last memory format: faster convolutions on CPU
    # (R-50-FPN at 800x1333: 1.93 s against 2.86 s in the default layout, BENCHMARKS.md). The head always sees standard (N, C, H, W) tensors.
    # Results equal those of the standard layout up to float rounding.
    _C.MODEL.SOLO.CHANNELS_LAST = True

    # Gradient clipping on the L2 norm of *all* parameters together (the reference clips the
    # whole model at 35). Detectron2's own SOLVER.CLIP_GRADIENTS clips each parameter separately;
    # solo_d2's Trainer reads this key instead. 0 disables it.
    _C.SOLVER.CLIP_GRADIENTS_FULL_MODEL_NORM = 0.0
    # Optimizer built by solo_d2's Trainer: "SGD" (Detectron2's, with SOLVER.MOMENTUM and
    # SOLVER.NESTEROV; the reference's) or "ADAMW" (torch.optim.AdamW with SOLVER.BETAS).
    # Both use BASE_LR, WEIGHT_DECAY, WEIGHT_DECAY_NORM, BIAS_LR_FACTOR and WEIGHT_DECAY_BIAS.
    # On the shapes demo from scratch, AdamW (LR 1e-3) learned no faster than SGD (BENCHMARKS.md).
    _C.SOLVER.OPTIMIZER = "SGD"
    # AdamW's (beta1, beta2); unused by SGD.
    _C.SOLVER.BETAS = (0.9, 0.999)
    # Mixed-precision training (SOLVER.AMP.ENABLED True) in this dtype: "float16" or "bfloat16";
    # "" picks the device's: float16 with a gradient scaler on CUDA (Detectron2's AMPTrainer),
    # bfloat16 on CPU (CPU autocast; bfloat16 has float32's exponent range, so no scaler).
    # On the shapes demo (2-core CPU with AVX512-BF16), bfloat16 made a training step about 1.5
    # times faster (BENCHMARKS.md). Float16 on CPU is refused (slow, and needs a scaler).
    _C.SOLVER.AMP.PRECISION = ""
    return cfg
