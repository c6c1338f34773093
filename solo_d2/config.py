"""Config of solo_d2: the keys (:func:`add_solo_config`), the one cfg builder
(:func:`get_solo_cfg`), and the one place that decides the device (:func:`resolve_device`) and the
precision it runs in (:func:`autocast_dtype`: a reduced precision only where the device executes it
natively).

Defaults follow the reference SOLO R-50-FPN on COCO (the SOLO paper and its official
implementation). Nothing here edits Detectron2's global defaults: :func:`add_solo_config` extends
a cfg from ``get_cfg()``. Which AP a setting gave is recorded in BENCHMARKS.md, not here.
"""
import logging
import os
import platform
from typing import Optional

import torch
import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .utils.cli import ConfigError

__all__ = [
    "add_solo_config",
    "check_tile_config",
    "get_solo_cfg",
    "resolve_device",
    "autocast_dtype",
    "native_bfloat16",
    "cpu_description",
    "AUTOCAST_DTYPES",
]

#: The reduced precisions solo_d2 runs under autocast, by config name (float32: no autocast).
AUTOCAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) under which bfloat16 convolutions are still native.
_ONEDNN_BF16_ISAS = ("ALL", "DEFAULT", "BF16", "AMX", "AVX10")

# Under "detectron2" so that the message reaches Detectron2's log handlers once they are set up.
logger = logging.getLogger("detectron2.solo_d2.config")


def resolve_device(device: str) -> str:
    """The device to run on for ``MODEL.DEVICE = device``: ``device`` itself, or ``"cpu"`` (with
    a warning) when it names CUDA and no CUDA device is available. Used by :func:`get_solo_cfg`
    and by :class:`solo_d2.SOLOPredictor`."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        logger.warning(f"MODEL.DEVICE = {device!r} but CUDA is not available: running on cpu")
        return "cpu"
    return device


def cpu_description() -> str:
    """This machine's CPU as every speed figure names it: the model name and the instruction set
    PyTorch dispatches to, e.g. ``"Intel(R) Xeon(R) Processor @ 2.80GHz (AVX512, no native
    bfloat16)"``."""
    name = platform.processor() or platform.machine() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    native = "native bfloat16" if native_bfloat16("cpu") else "no native bfloat16"
    return f"{name} ({torch.backends.cpu.get_cpu_capability()}, {native})"


def _arm_cpu_features() -> set:
    """The ``Features`` flags of an Arm CPU (``/proc/cpuinfo``), empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bfloat16(device) -> bool:
    """Whether ``device`` executes bfloat16 arithmetic natively, i.e. whether bfloat16 autocast
    makes it faster. Where it does not, oneDNN emulates bfloat16 on the CPU: a 3x3 convolution
    is 2x (AVX512 without BF16) to 100x (AVX2) slower than in float32 (BENCHMARKS.md).

    - CPU, x86: AVX512-BF16 or AMX, and PyTorch and oneDNN allowed to use them
      (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` reproduces an AVX2-only CPU);
    - CPU, Arm: the ``bf16`` feature (Armv8.6 BF16 instructions);
    - CUDA: compute capability 8.0 or higher (Ampere on); other devices: left to PyTorch (True).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if dev.type != "cpu":
        return True
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
        return (
            (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
            and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
            and any(k in isa for k in _ONEDNN_BF16_ISAS)
        )
    if machine in ("aarch64", "arm64"):
        return "bf16" in _arm_cpu_features()
    return False


def autocast_dtype(name: str, device, *, key: str, explicit: bool) -> Optional[torch.dtype]:
    """The autocast dtype to run in when the config key ``key`` asks for precision ``name``
    ("float32", "bfloat16" or "float16") on ``device``; None means float32 (no autocast).

    A reduced precision is used only where the device executes it natively: bfloat16 on a CPU
    without native bfloat16 (:func:`native_bfloat16`) gives float32 and logs one line saying so
    and why, unless ``explicit`` (the key named the dtype itself, i.e. the user forces it): then
    bfloat16, with a WARNING. float16 needs CUDA (CPUs compute it slowly, and training would
    need a gradient scaler): refused elsewhere with a ValueError naming ``key``.
    """
    if name == "float32":
        return None
    if name not in AUTOCAST_DTYPES:
        raise ValueError(
            f"{key} = {name!r}: expected one of {['float32'] + sorted(AUTOCAST_DTYPES)}"
        )
    dev = torch.device(device)
    if name == "float16" and dev.type != "cuda":
        raise ValueError(
            f"{key} = 'float16' with MODEL.DEVICE = {str(device)!r}: float16 autocast is for "
            "CUDA; on a CPU use 'bfloat16' (fast only where the CPU has native bfloat16)"
        )
    if name == "bfloat16" and not native_bfloat16(dev):
        where = cpu_description() if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})"
        if explicit:
            logger.warning(
                f"{key} = 'bfloat16' on {where}: bfloat16 is emulated here and runs many times "
                "slower than float32 (BENCHMARKS.md); running in bfloat16 as asked"
            )
            return torch.bfloat16
        logger.info(
            f"{key}: running in float32, not bfloat16, on {where}: native bfloat16 needs "
            "AVX512-BF16 or AMX (x86), BF16 (Arm) or CUDA compute capability 8.0; emulated it is "
            "many times slower. Name the dtype in the key to force it."
        )
        return None
    return AUTOCAST_DTYPES[name]


def get_solo_cfg(config_file=None, opts=(), device_fallback: bool = True):
    """A new (unfrozen) cfg: Detectron2's defaults + solo_d2's keys + ``config_file`` (if given)
    + ``opts`` (a flat ``[KEY, VALUE, ...]`` list). With ``device_fallback``, ``MODEL.DEVICE``
    goes through :func:`resolve_device` (CUDA -> cpu when CUDA is absent). A missing config file,
    an unknown key, a value of the wrong type or an odd-length ``opts`` raise
    :class:`solo_d2.utils.cli.ConfigError` naming the file or the options."""
    cfg = get_cfg()
    add_solo_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file {config_file!r}: " + (
                "a folder, not a config file" if os.path.isdir(config_file) else "no such file"))
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, AssertionError, ValueError, yaml.YAMLError) as e:  # yacs / PyYAML
            raise ConfigError(f"config file {config_file!r}: {_config_error_text(e)}") from e
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError, ValueError) as e:  # yacs: unknown key, odd length, type
        raise ConfigError(f"config options {' '.join(map(str, opts))!r}: {_config_error_text(e)}") from e
    if device_fallback:
        cfg.MODEL.DEVICE = resolve_device(cfg.MODEL.DEVICE)
    return cfg


def _config_error_text(e: BaseException) -> str:
    """One line of a yacs / PyYAML error (KeyError's str() would quote it)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split()) or type(e).__name__


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
    # How a level's feature is brought to the S x S category grid (the SOLO paper's three ways):
    # "bilinear" (sampled at each cell's centre; the reference), "adaptive_pool" (max over the
    # cell's region) or "region_grid" (mean of bilinear samples on a grid of points in the cell).
    _C.MODEL.SOLO.CATE_ALIGN = "bilinear"

    # Head (solo_d2.modeling.heads): "SOLOHead" (vanilla, S^2 mask channels per level),
    # "DecoupledSOLOHead" (published Decoupled SOLO: separate X / Y towers, S + S channels),
    # "DecoupledSOLOLightHead" (published light: one shared tower) or "DecoupledSOLOCompactHead"
    # (solo_d2's own variant: one shared tower, 1x1 X / Y convs) or "SOLOv2Head" (SOLOv2: a
    # dynamic kernel per cell on one unified mask feature).
    _C.MODEL.SOLO.HEAD_TYPE = "SOLOHead"
    # Channels of every conv in both towers.
    _C.MODEL.SOLO.CONV_CHANNELS = 256
    # Number of stacked 3x3 convs in each of the category and mask towers.
    _C.MODEL.SOLO.NUM_STACKED_CONVS = 7
    # Normalisation in the towers: "GN" (32 groups), "" for none, or any detectron2 get_norm name.
    _C.MODEL.SOLO.NORM = "GN"
    # How many convs of each tower, counted from the last, are deformable 3x3 convs (on
    # torchvision.ops.deform_conv2d) instead of plain ones. The reference Decoupled SOLO light DCN
    # model uses 1, the SOLOv2 R-101 DCN model all of them.
    _C.MODEL.SOLO.NUM_DEFORMABLE_CONVS = 0
    # Whether those deformable convs (and SOLOv2's MASK_FEATURE_DEFORMABLE convs) are modulated,
    # DCN v2 (offsets and a sigmoid modulation per kernel position, the published SOLOv2 DCN
    # models), instead of DCN v1.
    _C.MODEL.SOLO.DEFORMABLE_MODULATED = False
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
    # take steps ~35 times larger than He init's at 64 channels (~9 times at 256); "msra" suits
    # training from scratch (docs/benchmarks/demo.md). The output convs keep N(0, 0.01) and
    # the prior biases either way.
    _C.MODEL.SOLO.TOWER_INIT = "normal"

    # SOLOv2Head only. CONV_CHANNELS, NUM_STACKED_CONVS, NUM_DEFORMABLE_CONVS and NORM apply to
    # its category and kernel towers alike (the reference shares them).
    # E: channels of the unified mask feature, which each cell's kernel is convolved with.
    _C.MODEL.SOLO.MASK_FEATURE_DIM = 256
    # Channels of the mask feature branch's per-level convs (before its 1x1 conv to E).
    _C.MODEL.SOLO.MASK_FEATURE_CHANNELS = 128
    # The unified mask feature is built from this many of the finest IN_FEATURES (P2-P5).
    _C.MODEL.SOLO.MASK_FEATURE_NUM_LEVELS = 4
    # k: spatial size of each dynamic kernel (odd); a cell's kernel has E * k * k values.
    _C.MODEL.SOLO.DYNAMIC_KERNEL_SIZE = 1
    # Every conv of the mask feature branch (its 3x3 convs and its 1x1 output conv) deformable,
    # of the type DEFORMABLE_MODULATED selects (the published SOLOv2 R-101 DCN model: DCN v2).
    _C.MODEL.SOLO.MASK_FEATURE_DEFORMABLE = False

    # Losses: L = LOSS_CATE_WEIGHT * focal + LOSS_MASK_WEIGHT * dice.
    _C.MODEL.SOLO.LOSS_CATE_WEIGHT = 1.0
    _C.MODEL.SOLO.LOSS_MASK_WEIGHT = 3.0
    # Sigmoid focal loss alpha and gamma (category branch); gamma 0 is alpha-balanced BCE. Gamma
    # must be 0 or >= 1: for 0 < gamma < 1 the loss has a NaN gradient where a prediction is
    # certain (checked at build). The shapes configs use 0: focal gamma scales down the gradient
    # of the wrong classes of an undecided cell, which slows a category branch trained from
    # scratch (docs/benchmarks/demo.md).
    _C.MODEL.SOLO.FOCAL_LOSS_ALPHA = 0.25
    _C.MODEL.SOLO.FOCAL_LOSS_GAMMA = 2.0

    # Inference.
    # Category score threshold for candidate cells (after point NMS).
    _C.MODEL.SOLO.SCORE_THRESH_TEST = 0.1
    # Threshold that binarises soft masks (for area, maskness, Matrix NMS and the output masks).
    _C.MODEL.SOLO.MASK_THRESH_TEST = 0.5
    # Drop detections whose score after Matrix NMS decay is below this.
    _C.MODEL.SOLO.UPDATE_THRESH_TEST = 0.05
    # Maximum number of detections per image.
    _C.MODEL.SOLO.MAX_PER_IMAGE = 100
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

    # Run the backbone (ResNet + FPN) and the SOLO head's convolutions in channels-last memory
    # format: faster convolutions on CPU for a BatchNorm ResNet and for the GroupNorm towers
    # (docs/benchmarks/speed_cpu.md). The head's outputs are standard (N, C, H, W)
    # tensors; results equal those of the standard layout up to float rounding. Applied where it
    # pays (solo_d2.modeling.meta_arch.channels_last_pays decides): always on the CPU; on CUDA not
    # when NORM is "GN" (CUDA's GroupNorm takes standard-layout inputs: each GN layer of the head
    # would copy twice; unmeasured on a GPU).
    _C.MODEL.SOLO.CHANNELS_LAST = True
    # Inference precision of backbone and head (autocast on the model's device; post-processing
    # always runs in float32 with autocast off, and outputs keep their dtypes: float32 scores, bool masks):
    # "float32"; "auto": the device's fast reduced precision where it has one (float16 on CUDA,
    # bfloat16 on a CPU with native bfloat16), else float32 with one log line saying why; or
    # "bfloat16" / "float16" to force that dtype (a WARNING where bfloat16 is emulated: many
    # times slower). Speed and accuracy against float32: BENCHMARKS.md.
    _C.MODEL.SOLO.INFERENCE_DTYPE = "float32"

    # Gradient clipping on the L2 norm of *all* parameters together (the reference clips the
    # whole model at 35). Detectron2's own SOLVER.CLIP_GRADIENTS clips each parameter separately;
    # solo_d2's Trainer reads this key instead. 0 disables it.
    _C.SOLVER.CLIP_GRADIENTS_FULL_MODEL_NORM = 0.0
    # Optimizer built by solo_d2's Trainer: "SGD" (Detectron2's, with SOLVER.MOMENTUM and
    # SOLVER.NESTEROV; the reference's) or "ADAMW" (torch.optim.AdamW with SOLVER.BETAS).
    # Both use BASE_LR, WEIGHT_DECAY, WEIGHT_DECAY_NORM, BIAS_LR_FACTOR and WEIGHT_DECAY_BIAS.
    _C.SOLVER.OPTIMIZER = "SGD"
    # AdamW's (beta1, beta2); unused by SGD.
    _C.SOLVER.BETAS = (0.9, 0.999)
    # SOLVER.AMP.ENABLED True means "mixed precision where it is fast". This key picks its dtype:
    # "" the device's: float16 with a gradient scaler on CUDA (Detectron2's AMPTrainer), bfloat16
    # on a CPU with native bfloat16 (CPU autocast; float32's exponent range, so no scaler), and
    # float32 on a CPU without it (one log line says so: emulated bfloat16 is 2-100x slower);
    # "float16" or "bfloat16" force that dtype (a WARNING where bfloat16 is emulated). float16 on
    # CPU is refused (slow, and needs a scaler). Step times: BENCHMARKS.md.
    _C.SOLVER.AMP.PRECISION = ""
    # Whole minutes of training to fit the schedule to (0: off, SOLVER.MAX_ITER as given). Before
    # training, a probe times a few training steps on this machine (data loading included) in
    # each memory layout (MODEL.SOLO.CHANNELS_LAST) and keeps the faster; MAX_ITER becomes the
    # iterations that fit (at most SOLVER.MAX_ITER), with SOLVER.STEPS and WARMUP_ITERS scaled by
    # the same factor. The log and OUTPUT_DIR/time_budget.json say what it chose; a later run in
    # the same OUTPUT_DIR with the same budget (e.g. --resume) reuses that choice.
    _C.SOLVER.TIME_BUDGET_MINUTES = 0

    # Tiled inference of images larger than the model's test size (solo_d2.inference,
    # docs/predictions.md): the image is cut into overlapping square tiles, each predicted at
    # the test size, and the tiles' instances merged into one image's. ENABLED makes the
    # evaluation (train_net.py --eval-only, and evaluations during training) tile the images
    # larger than MIN_IMAGE_RATIO x SIZE; tools/predict.py reads the other keys with --tile.
    _C.TEST.TILE = CN(
        {
            "ENABLED": False,
            # Tile side in input pixels; 0: the test size, INPUT.MIN_SIZE_TEST (a tile is then seen
            # at its own resolution).
            "SIZE": 0,
            # Pixels shared by neighbouring tiles (0 <= OVERLAP < tile side); an object narrower
            # than this is seen whole by at least one tile.
            "OVERLAP": 64,
            # Only images whose longer side is more than this many tile sides are tiled; the others
            # are inferred whole, resized to the test size as without tiling. 0: tile every image
            # larger than one tile.
            "MIN_IMAGE_RATIO": 1.5,
            # Two detections of one class from two tiles are one object (merged: the union of their
            # masks) when their masks' IoU inside the region both tiles see is at least this (> 1:
            # never merge).
            "MERGE_IOU": 0.5,
            # Two such detections are also one object when one of them is cut by a tile edge (a
            # fragment) and, inside the region both tiles see, at least this fraction of the smaller
            # of the two masks there lies in the other (intersection / smaller area): a fragment
            # that the other tile's mask contains, whatever their IoU (> 1: IoU only).
            "MERGE_COVER": 0.8,
            # Also merge two tiles' detections of different classes (the object takes its
            # best-scored part's class): two tiles may name one object differently, which
            # otherwise leaves it twice at the seam. False keeps both class hypotheses (which COCO
            # AP rewards slightly), at the price of such duplicates.
            "MERGE_ACROSS_CLASSES": True,
            # Maximum number of instances of a tiled image (MODEL.SOLO.MAX_PER_IMAGE still applies
            # per tile). With ENABLED, the COCO evaluation counts up to max(100, this) detections
            # per image (COCO's standard is 100: APs of large images are then not comparable with
            # standard APs).
            "MAX_PER_IMAGE": 1000,
            # Tiles predicted per model call.
            "BATCH_SIZE": 1,
            # Also predict the whole image resized to the test size (as without tiling) and take the
            # large objects from it: an object larger than a tile is seen by the tiles only in
            # parts.
            "WHOLE_IMAGE_PASS": True,
            # The whole-image pass's instances whose box's longer side is more than this (image
            # pixels) are kept; the others are dropped (the tiles see them at a higher resolution).
            # 0: the tile stride, tile side - OVERLAP (an object longer than the stride lies inside
            # one tile only by chance; one longer than the tile side never).
            "WHOLE_IMAGE_MIN_SIZE": 0,
            # A tile's detection is dropped as a part or a copy of a kept whole-image instance when
            # at least this fraction of the smaller of the two masks lies in both (intersection /
            # smaller area, any class) and the detection is cut by its tile's edge (a part) or at
            # least half the whole-image mask's area (a copy); a small object the tile sees whole
            # stays.
            "WHOLE_IMAGE_COVER": 0.5,
        }
    )
    return cfg


def check_tile_config(cfg) -> None:
    """Raise :class:`solo_d2.utils.cli.ConfigError` naming each ``TEST.TILE`` key whose value
    is out of range (add_solo_config says what the keys mean)."""
    t = cfg.TEST.TILE
    size = t.SIZE or cfg.INPUT.MIN_SIZE_TEST
    problems = []
    if t.SIZE < 0:
        problems.append(f"TEST.TILE.SIZE = {t.SIZE}: expected a tile side > 0 (0: INPUT.MIN_SIZE_TEST)")
    elif size <= 0:
        problems.append(f"TEST.TILE.SIZE = 0 means INPUT.MIN_SIZE_TEST, which is {size}: give a "
                        "tile side > 0")
    if t.OVERLAP < 0 or (size > 0 and t.OVERLAP >= size):
        problems.append(f"TEST.TILE.OVERLAP = {t.OVERLAP}: expected 0 <= OVERLAP < the tile "
                        f"side ({size})")
    if t.MIN_IMAGE_RATIO < 0:
        problems.append(f"TEST.TILE.MIN_IMAGE_RATIO = {t.MIN_IMAGE_RATIO}: expected >= 0")
    if not t.MERGE_IOU > 0:
        problems.append(f"TEST.TILE.MERGE_IOU = {t.MERGE_IOU}: expected > 0 (> 1: never merge)")
    if t.MAX_PER_IMAGE < 1:
        problems.append(f"TEST.TILE.MAX_PER_IMAGE = {t.MAX_PER_IMAGE}: expected >= 1")
    if t.BATCH_SIZE < 1:
        problems.append(f"TEST.TILE.BATCH_SIZE = {t.BATCH_SIZE}: expected >= 1")
    if not t.MERGE_COVER > 0:
        problems.append(f"TEST.TILE.MERGE_COVER = {t.MERGE_COVER}: expected > 0 (> 1: IoU only)")
    for key in ("MERGE_ACROSS_CLASSES", "WHOLE_IMAGE_PASS"):
        if not isinstance(t[key], bool):
            problems.append(f"TEST.TILE.{key} = {t[key]!r}: expected True or False")
    if t.WHOLE_IMAGE_MIN_SIZE < 0:
        problems.append(f"TEST.TILE.WHOLE_IMAGE_MIN_SIZE = {t.WHOLE_IMAGE_MIN_SIZE}: expected "
                        ">= 0 (0: tile side - OVERLAP)")
    if not 0 < t.WHOLE_IMAGE_COVER <= 1:
        problems.append(f"TEST.TILE.WHOLE_IMAGE_COVER = {t.WHOLE_IMAGE_COVER}: expected in (0, 1]")
    if problems:
        raise ConfigError("\n".join(problems))
